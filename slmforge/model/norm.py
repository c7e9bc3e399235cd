"""RMSNorm: x / rms(x) * weight, computed in float32 for stability under autocast.

PyTorch's CPU `F.rms_norm` is a composite of ~6 element-wise ops forward and ~15 backward; the autograd
function below does the same math in 3 passes forward and 5 backward (measured effect in
benchmarks/README.md). Without autograd (generation, evaluation) it skips the autograd machinery.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dim, keepdim; one pass over x (x is float32)."""
    sq_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
    return sq_norm.div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = _rstd(x, eps)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_hat, weight, rstd = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx (x_hat * w) = rstd * (g*w - x_hat * mean(g*w * x_hat))
            gw = grad * weight
            mean_gw_xhat = torch.linalg.vecdot(gw, x_hat).unsqueeze_(-1).div_(x_hat.shape[-1])
            grad_x = gw.sub_(x_hat * mean_gw_xhat).mul_(rstd)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim, computed in float32, returned in x's dtype."""
    # dtype checks in Python: a no-op .float() still costs a dispatch, and decoding calls this 2L + 1 times a token
    x32 = x if x.dtype == torch.float32 else x.float()
    w32 = weight if weight.dtype == torch.float32 else weight.float()
    if torch.is_grad_enabled() and (x32.requires_grad or w32.requires_grad):
        y = _RMSNormFunction.apply(x32, w32, eps)
    elif x32.numel() <= 16 * x32.shape[-1]:  # a few tokens (decoding): one call beats three passes
        y = F.rms_norm(x32, (x32.shape[-1],), w32, eps)
    else:
        y = (x32 * _rstd(x32, eps)).mul_(w32)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
