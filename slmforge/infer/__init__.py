"""Inference: sampling from logits and batched generation with the KV cache."""

from slmforge.infer.generate import Completion, generate, generate_ids
from slmforge.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    greedy,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Completion",
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_temperature",
    "generate",
    "generate_ids",
    "greedy",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]
