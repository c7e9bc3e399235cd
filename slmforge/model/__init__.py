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


def packs_documents(cfg: ModelConfig) -> bool:
    """Whether the model attends within each of several documents packed in a row (`documents=`)."""
    return cfg.arch != "multiscale"


def packs_rows(packing: str, cfg: ModelConfig) -> bool:
    """Whether chat rows are packed under data.packing = `packing` (auto: where the model can)."""
    if packing == "pack" and not packs_documents(cfg):
        raise ValueError(f"=pack: the {cfg.arch} model cannot keep packed conversations apart; use pad (or auto)")
    return packing == "pack" or (packing == "auto" and packs_documents(cfg))


__all__ = ["KVCache", "MultiScaleTransformer", "Transformer", "build_model", "packs_documents", "packs_rows"]
