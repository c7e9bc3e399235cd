"""Model parts; `build_model` assembles the model a ModelConfig describes: the decoder (`Transformer`)
or the multi-scale byte transformer (`MultiScaleTransformer`, model.arch = "multiscale")."""

from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cache import KVCache
from slmforge.model.multiscale import MultiScaleTransformer
from slmforge.model.transformer import Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg.arch`, freshly initialised."""
    return MultiScaleTransformer(cfg) if cfg.arch == "multiscale" else Transformer(cfg)


__all__ = ["KVCache", "MultiScaleTransformer", "Transformer", "build_model"]
