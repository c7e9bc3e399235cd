"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

Training runs gate and up as two matmuls: fusing them (one matmul against the concatenated weights)
measured ~2-4% slower per training step on CPU (a [N, 2 d_ff] output read through strided halves, and its
gradient assembled by a copy). Generation fuses them into one matrix (a copy, kept until the weights
change), where one matrix-vector product instead of two does pay.
"""

import torch
import torch.nn.functional as F
from torch import nn


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """F.linear for generation. A single float32 row (one token) is a matrix-vector product bound by memory
    bandwidth, which MKL runs on one thread (~14 GB/s here): cut into `splits` row blocks of the weight, a
    batched matmul reads them on `splits` threads at once (~25 GB/s on 2 cores), with the same products
    and sums. bf16/fp16 products already use every thread, so they, and several rows, go to F.linear."""
    out_features, in_features = weight.shape
    if (splits > 1 and x.numel() == in_features and out_features % splits == 0 and weight.is_contiguous()
            and x.dtype == weight.dtype == torch.float32):
        # x as an [in, 1] column with strides (1, in): with (1, 1), MKL takes a 4x slower path.
        column = x.as_strided((splits, in_features, 1), (0, 1, in_features)) if x.is_contiguous() else \
            x.reshape(1, in_features).t().expand(splits, -1, -1)
        y = torch.bmm(weight.view(splits, -1, in_features), column)
        y = y.view(*x.shape[:-1], out_features)
        return y if bias is None else y.add_(bias)
    return F.linear(x, weight, bias)


class FusedCopy:
    """A concatenation of parameters for generation, kept between calls until one of them changes
    (tracked by storage and version counter, so optimizer steps and load_state_dict are seen)."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, tensors: list[torch.Tensor], build):
        try:
            key = (*(t._version for t in tensors), *(t.data_ptr() for t in tensors))
        except RuntimeError:  # inference tensors have no version counter to watch: build every time
            return build()
        if key != self.key:
            self.key, self.value = None, None  # free the stale copy first
            with torch.no_grad(), torch.inference_mode(False):
                self.value = build()
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.generation_weights = FusedCopy()

    def fused_gate_up(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gate and up as one [2 d_ff, d_model] weight (and bias)."""
        weight = torch.cat((self.gate_proj.weight, self.up_proj.weight))
        bias = None if self.gate_proj.bias is None else torch.cat((self.gate_proj.bias, self.up_proj.bias))
        return weight, bias

    def forward(self, x: torch.Tensor, gen_splits: int | None = None) -> torch.Tensor:
        """`gen_splits`: None in training and evaluation; in generation (autograd off), the number of
        blocks `decode_linear` splits a one-token product into."""
        if gen_splits is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        params = [p for m in (self.gate_proj, self.up_proj) for p in (m.weight, m.bias) if p is not None]
        weight, bias = self.generation_weights.get(params, self.fused_gate_up)
        gate, up = decode_linear(x, weight, bias, gen_splits).chunk(2, dim=-1)
        return decode_linear(F.silu(gate).mul_(up), self.down_proj.weight, self.down_proj.bias, gen_splits)
