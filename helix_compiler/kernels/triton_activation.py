"""Fused MLP activations: ``gelu(x + bias)`` (tanh approximation, as Megatron's bias-GeLU
fusion, or the exact erf form, torch's default) and ``silu(gate) * up`` (SwiGLU).

Each is a ``torch.autograd.Function`` around one Triton kernel per direction. The forward
saves only its inputs (``x``/``bias`` or ``gate``/``up``), never the activation output: the
backward kernel recomputes ``gelu'(x + bias)`` / ``sigmoid(gate)`` from them. The math runs
in fp32 and is stored in the input dtype.

``backend=None`` picks Triton for CUDA tensors (when ``triton`` imports) and the plain torch
ops elsewhere; ``backend="triton"`` forces the kernels (on CPU only under
``TRITON_INTERPRET=1``, which is how the tests run them), ``backend="torch"`` the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HelixError
from .triton_attention import interpreting, lazily_jitted, triton_importable

_BLOCK = 1024
_kernels = lazily_jitted("._triton_activation_kernels", gelu_fwd="bias_gelu_fwd_kernel",
                         gelu_bwd="bias_gelu_bwd_kernel", silu_fwd="silu_mul_fwd_kernel",
                         silu_bwd="silu_mul_bwd_kernel")


def triton_usable(t: Tensor) -> bool:
    """Can the Triton kernels run on this tensor's device here?"""
    if not triton_importable():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def resolve_backend(t: Tensor, backend: str | None) -> str:
    if backend is None:
        return "triton" if t.is_cuda and triton_importable() else "torch"
    if backend not in ("triton", "torch"):
        raise HelixError(f"activation backend {backend!r} is unknown; use 'triton', 'torch' "
                         "or None (automatic)")
    if backend == "triton" and not triton_usable(t):
        raise HelixError(f"activation backend 'triton' is not usable on {t.device}: it needs "
                         "the triton package and CUDA, or for CPU tensors TRITON_INTERPRET=1 "
                         "set before triton is first imported")
    return backend


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // _BLOCK)),)


def _check_approximate(approximate: str) -> None:
    if approximate not in ("tanh", "none"):
        raise HelixError(f"gelu approximate={approximate!r}; use 'tanh' or 'none'")


class BiasGeLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
        x_c = x.contiguous()
        b_c = bias.contiguous() if bias is not None else None
        y = torch.empty_like(x_c)
        n, h = x_c.numel(), x_c.shape[-1]
        _kernels().gelu_fwd[_grid(n)](x_c, b_c if b_c is not None else x_c, y, n, h,
                                      HAS_BIAS=b_c is not None,
                                      APPROX_TANH=approximate == "tanh", BLOCK=_BLOCK)
        ctx.save_for_backward(x_c, b_c)
        ctx.approximate = approximate
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_c, b_c = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x_c)
        n, h = x_c.numel(), x_c.shape[-1]
        _kernels().gelu_bwd[_grid(n)](dy, x_c, b_c if b_c is not None else x_c, dx, n, h,
                                      HAS_BIAS=b_c is not None,
                                      APPROX_TANH=ctx.approximate == "tanh", BLOCK=_BLOCK)
        dbias = None
        if b_c is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, h).sum(0, dtype=torch.float32).to(b_c.dtype)
        return dx, dbias, None


class SiLUMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        _kernels().silu_fwd[_grid(g.numel())](g, u, y, g.numel(), BLOCK=_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _kernels().silu_bwd[_grid(g.numel())](dy.contiguous(), g, u, dg, du, g.numel(),
                                              BLOCK=_BLOCK)
        return dg, du


def bias_gelu(x: Tensor, bias: Tensor | None = None, approximate: str = "tanh", *,
              backend: str | None = None) -> Tensor:
    """``gelu(x + bias, approximate=approximate)`` (bias along the last dim, may be None)."""
    _check_approximate(approximate)
    if bias is not None and bias.shape != x.shape[-1:]:
        raise HelixError(f"bias_gelu: bias{tuple(bias.shape)} must be [{x.shape[-1]}] for "
                         f"x{tuple(x.shape)}")
    if resolve_backend(x, backend) == "torch":
        return F.gelu(x if bias is None else x + bias, approximate=approximate)
    return BiasGeLUFunction.apply(x, bias, approximate)


def silu_mul(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up`` (same shapes)."""
    if gate.shape != up.shape:
        raise HelixError(f"silu_mul: gate{tuple(gate.shape)} and up{tuple(up.shape)} differ")
    if resolve_backend(gate, backend) == "torch":
        return F.silu(gate) * up
    return SiLUMulFunction.apply(gate, up)
