"""Training: the loop (`train`), checkpoints (`load_checkpoint`) and held-out evaluation (`evaluate`)."""

from slmforge.train.checkpoint import load_checkpoint
from slmforge.train.integrity import CheckpointError
from slmforge.train.evaluate import evaluate
from slmforge.train.errors import TrainingError
from slmforge.train.trainer import train

__all__ = ["CheckpointError", "TrainingError", "evaluate", "load_checkpoint", "train"]
