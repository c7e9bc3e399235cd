"""Decode-time kernel choices, for every model family, in one place.

A decoding step multiplies a few token rows by every weight matrix, so its speed is how fast the weights
are read. `prepare_for_decoding` sets the projections the model parts leave open for decoding (see
`Attention.qkv_proj`, `SwiGLU.gate_up_proj`, `MLAttention.input_proj`, the models' `head_proj`) and swaps the
other linear layers the decoder runs per token, so that:
- q/k/v, gate/up and MLA's two input projections are one matrix each (fewer, larger products). The fused
  matrix is the only plain copy: the separate parameters become views of its rows.
- each float product runs the fastest of MKL, the weight split over the threads and oneDNN's packed
  weights (when decoding batches), as timed for its shape and number of rows (`FloatLinear`).
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


class FloatLinear(nn.Module):
    """F.linear for decoding, with the fastest kernel for each number of token rows. Three candidates:
    - F.linear (MKL);
    - the weight cut into row blocks, one per thread, in one batched matmul (float32, up to 16 rows): MKL
      runs a matrix-vector product on one thread, this reads the weight on every thread at once, with the
      same products and sums;
    - oneDNN's product on a copy of the weight packed in its own layout (`packed=True`: twice the weight's
      memory), much faster than MKL for a handful of rows.
    Which wins depends on the machine, the shape and the rows, so the first product of each shape and
    power-of-two bucket of rows is timed with every candidate and the fastest kept (`KERNEL_CHOICES`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool = False):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.packed = _pack(self.weight) if packed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, threads = self.weight, torch.get_num_threads()
        if x.device.type != "cpu" or x.dtype != weight.dtype:
            return F.linear(x, weight, self.bias)
        out_features, in_features = weight.shape
        rows = x.numel() // in_features
        key = (out_features, in_features, 1 << (rows - 1).bit_length(), threads, x.dtype, self.packed is not None)
        if key not in KERNEL_CHOICES:
            candidates = {"linear": lambda: F.linear(x, weight, self.bias)}
            if (threads > 1 and rows <= 16 and out_features % threads == 0 and weight.is_contiguous()
                    and x.dtype == torch.float32):
                candidates["split"] = lambda: self._split(x, threads)
            if self.packed is not None:
                candidates["packed"] = lambda: self._packed(x)
            KERNEL_CHOICES[key] = _fastest(candidates, cold=weight.numel() * weight.element_size() >= 1 << 20)
        choice = KERNEL_CHOICES[key]
        if choice == "packed":
            return self._packed(x)
        if choice == "split":
            y = self._split(x, threads)
            return y if self.bias is None else y.add_(self.bias)
        return F.linear(x, weight, self.bias)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

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


# (out, in, rows rounded up to a power of two, threads, dtype, packed) -> the fastest kernel
KERNEL_CHOICES: dict[tuple, str] = {}


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of a CPU weight (for 16 rows), or None where oneDNN cannot pack it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
    except (RuntimeError, AttributeError):
        return None


def _fastest(candidates: dict, cold: bool) -> str:
    """The name of the fastest of some calls, each timed as the best of 3 after one warm-up. `cold`: the
    caches are flushed before each timed call, because a decoding step reads each weight from memory once,
    where repeated calls would find it in the cache and reward compute over streaming."""
    flush = torch.empty(CACHE_FLUSH_BYTES // 4) if cold else None
    times = {}
    for name, call in candidates.items():
        call()
        best = float("inf")
        for _ in range(3):
            if flush is not None:
                flush.fill_(1.0)
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    return min(times, key=times.get)


CACHE_FLUSH_BYTES = 128 << 20  # more than the last-level cache of the CPUs this runs on (32 MiB here)


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


def _make(weight: torch.Tensor, bias: torch.Tensor | None, weights: str, packed: bool) -> nn.Module:
    return Int8Linear(weight, bias) if weights == "int8" else FloatLinear(weight, bias, packed)


def _fuse(linears: list[nn.Linear], weights: str, packed: bool) -> nn.Module:
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
    return _make(weight, bias, weights, packed)


def _swap(parent: nn.Module, name: str, weights: str, packed: bool) -> None:
    linear = getattr(parent, name)
    if isinstance(linear, nn.Linear):
        setattr(parent, name, _make(linear.weight, linear.bias, weights, packed))


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, weights: str = "float", batch_rows: int = 1) -> nn.Module:
    """Set `model` (a model or any of its parts) up for fast decoding in place, as the module docstring
    says, and return it in eval mode. `batch_rows`: the most sequences decoded at once; above 1, float
    matrices keep a packed copy for oneDNN too (twice their memory), which multiplies several rows faster."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights == "int8" and not hasattr(torch, "_int_mm"):
        raise ValueError(f"weights='int8' needs torch._int_mm, which torch {torch.__version__} lacks")
    packed = batch_rows > 1
    model.eval()
    # the multi-scale model's cross-scale attention calls q, k, v separately (queries and keys differ)
    cross = {id(m.attn) for m in model.modules() if isinstance(m, CrossScaleAttention)}
    for module in list(model.modules()):
        if isinstance(module, Attention) and id(module) in cross:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _swap(module, name, weights, packed)
        elif isinstance(module, Attention):
            if module.qkv_proj is None:
                module.qkv_proj = _fuse([module.q_proj, module.k_proj, module.v_proj], weights, packed)
            _swap(module, "o_proj", weights, packed)
        elif isinstance(module, MLAttention):
            if module.input_proj is None:
                q_in = module.q_proj if module.q_proj is not None else module.q_a_proj
                module.input_proj = _fuse([q_in, module.kv_a_proj], weights, packed)
            for name in ("q_b_proj", "o_proj"):  # kv_b_proj stays: absorbed decoding reads its weight
                if getattr(module, name) is not None:
                    _swap(module, name, weights, packed)
        elif isinstance(module, SwiGLU):
            if module.gate_up_proj is None:
                module.gate_up_proj = _fuse([module.gate_proj, module.up_proj], weights, packed)
            _swap(module, "down_proj", weights, packed)
        elif isinstance(module, MTPModule):
            _swap(module, "proj", weights, packed)
    if hasattr(model, "head_weight") and model.head_proj is None:  # a whole model, not one of its parts
        model.head_proj = _make(model.head_weight(), None, weights, packed)
    return model
