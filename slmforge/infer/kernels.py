"""Decode-time kernel choices, for every model family, in one place.

A decoding step multiplies a few token rows by every weight matrix, so its speed is how fast the weights
are read. `prepare_for_decoding` sets the projections the model parts leave open for decoding (see
`Attention.qkv_proj`, `SwiGLU.gate_up_proj`, `MLAttention.input_proj`, the models' `head_proj`) and swaps the
other linear layers the decoder runs per token, so that:
- q/k/v, gate/up and MLA's two input projections are one matrix each (fewer, larger products). The fused
  matrix is the only copy: the separate parameters become views of its rows.
- one float32 row is split over the CPU threads (`SplitLinear`); MKL runs a matrix-vector product on one.
- `weights="int8"` stores each matrix as int8 with a float scale per output row, and quantises each token
  row's activations to int8 with its own scale (W8A8, as llama.cpp's q8_0 products do per block): a
  quarter of float32's bytes, and a row's result never depends on the other rows of the batch.
Router, norms, embeddings and stacked expert weights keep their format. A prepared model is for inference:
its weights must not be trained further (`weights="int8"` no longer reads the float matrices).
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.model.attention import Attention
from slmforge.model.ffn import SwiGLU
from slmforge.model.mla import MLAttention
from slmforge.model.mtp import MTPModule
from slmforge.model.multiscale import CrossScaleAttention

WEIGHT_FORMATS = ("float", "int8")  # float: the model's own dtype


class SplitLinear(nn.Module):
    """F.linear for decoding. A few float32 rows make a matrix-vector-like product bound by memory bandwidth,
    which MKL runs on one thread: cut into row blocks of the weight, one per thread, a batched matmul reads
    them on every thread at once, with the same products and sums. Which of the two is faster for a given
    number of rows depends on the machine, so the first product of each shape times both and keeps the
    faster (`SPLIT_CHOICES`). bf16/fp16 products already use every thread and go to F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, splits = self.weight, torch.get_num_threads()
        out_features, in_features = weight.shape
        rows = x.numel() // in_features
        if (splits > 1 and rows <= MAX_SPLIT_ROWS and out_features % splits == 0 and weight.is_contiguous()
                and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"):
            key = (out_features, in_features, rows, splits)
            if key not in SPLIT_CHOICES:
                SPLIT_CHOICES[key] = _faster(lambda: self._split(x, splits), lambda: F.linear(x, weight)) == 0
            if SPLIT_CHOICES[key]:
                y = self._split(x, splits)
                return y if self.bias is None else y.add_(self.bias)
        return F.linear(x, weight, self.bias)

    def _split(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        out_features, in_features = self.weight.shape
        blocks = self.weight.view(splits, -1, in_features)
        if x.numel() == in_features:
            # x as an [in, 1] column with strides (1, in): with (1, 1), MKL takes a 4x slower path.
            column = x.as_strided((splits, in_features, 1), (0, 1, in_features)) if x.is_contiguous() else \
                x.reshape(1, in_features).t().expand(splits, -1, -1)
            return torch.bmm(blocks, column).view(*x.shape[:-1], out_features)
        columns = x.reshape(-1, in_features).t().expand(splits, -1, -1)  # [splits, in, rows]
        y = torch.bmm(blocks, columns)  # [splits, out / splits, rows]
        return y.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)


MAX_SPLIT_ROWS = 16  # beyond this many rows F.linear's matrix product is at least as fast (measured)
SPLIT_CHOICES: dict[tuple[int, int, int, int], bool] = {}  # (out, in, rows, threads) -> split is faster


def _faster(*candidates) -> int:
    """The index of the fastest of some calls, each timed as the best of 3 after one warm-up."""
    times = []
    for call in candidates:
        call()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times.index(min(times))


class Int8Linear(nn.Module):
    """y = x W^T + b with W as int8 [out, in] and a scale per output row, x quantised per row to int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)
        q = torch.round(rows / x_scale).to(torch.int8)
        y = torch._int_mm(q, self.qweight.t()).float().mul_(x_scale).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias.float())
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def _make(weight: torch.Tensor, bias: torch.Tensor | None, weights: str) -> nn.Module:
    return Int8Linear(weight, bias) if weights == "int8" else SplitLinear(weight, bias)


def _fuse(linears: list[nn.Linear], weights: str) -> nn.Module:
    """One projection for several linear layers of the same input; in float, the layers' weights (and
    biases) become views of the fused matrix's rows, so it costs no memory."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    if weights == "float":
        row = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[row:row + n], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
            row += n
    return _make(weight, bias, weights)


def _swap(parent: nn.Module, name: str, weights: str) -> None:
    linear = getattr(parent, name)
    if isinstance(linear, nn.Linear):
        setattr(parent, name, _make(linear.weight, linear.bias, weights))


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, weights: str = "float") -> nn.Module:
    """Set `model` (a model or any of its parts) up for fast decoding in place, as the module docstring
    says, and return it in eval mode."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights == "int8" and not hasattr(torch, "_int_mm"):
        raise ValueError(f"weights='int8' needs torch._int_mm, which torch {torch.__version__} lacks")
    model.eval()
    # the multi-scale model's cross-scale attention calls q, k, v separately (queries and keys differ)
    cross = {id(m.attn) for m in model.modules() if isinstance(m, CrossScaleAttention)}
    for module in list(model.modules()):
        if isinstance(module, Attention) and id(module) in cross:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _swap(module, name, weights)
        elif isinstance(module, Attention):
            if module.qkv_proj is None:
                module.qkv_proj = _fuse([module.q_proj, module.k_proj, module.v_proj], weights)
            _swap(module, "o_proj", weights)
        elif isinstance(module, MLAttention):
            if module.input_proj is None:
                q_in = module.q_proj if module.q_proj is not None else module.q_a_proj
                module.input_proj = _fuse([q_in, module.kv_a_proj], weights)
            for name in ("q_b_proj", "o_proj"):  # kv_b_proj stays: absorbed decoding reads its weight
                if getattr(module, name) is not None:
                    _swap(module, name, weights)
        elif isinstance(module, SwiGLU):
            if module.gate_up_proj is None:
                module.gate_up_proj = _fuse([module.gate_proj, module.up_proj], weights)
            _swap(module, "down_proj", weights)
        elif isinstance(module, MTPModule):
            _swap(module, "proj", weights)
    if hasattr(model, "head_weight") and model.head_proj is None:  # a whole model, not one of its parts
        model.head_proj = _make(model.head_weight(), None, weights)
    return model
