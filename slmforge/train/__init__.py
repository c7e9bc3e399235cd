"""Training: the loop (`train`), checkpoints (`load_checkpoint`) and held-out evaluation (`evaluate`)."""

from slmforge.train.checkpoint import CheckpointError, load_checkpoint
from slmforge.train.evaluate import evaluate
from slmforge.train.trainer import TrainingError, train

__all__ = ["CheckpointError", "TrainingError", "evaluate", "load_checkpoint", "train"]
