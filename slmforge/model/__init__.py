"""Model parts; `Transformer` assembles them from a ModelConfig."""

from slmforge.model.cache import KVCache
from slmforge.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
