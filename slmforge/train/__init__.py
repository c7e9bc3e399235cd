"""Training: the loop (`train`). Loading a model to use it is `slmforge.infer.load.load_model`, held-out
figures are `slmforge.eval.heldout`, checkpoint folders are `slmforge.checkpoint`."""

from slmforge.train.errors import TrainingError
from slmforge.train.trainer import train

__all__ = ["TrainingError", "train"]
