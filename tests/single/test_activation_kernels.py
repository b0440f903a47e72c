"""Fused MLP activation kernels (bias+GeLU tanh/erf, SiLU*up) against torch, forward and backward.

The Triton kernels run in Triton's interpreter on CPU. As in test_attention_backends.py, the
interpreter tests (names containing ``interp``) run in-process only when ``TRITON_INTERPRET=1``
was set before triton was imported, otherwise in a child pytest started by
``test_activation_kernels_run_in_child_process``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from interp_child import run_interp_tests_in_child

from helix_compiler.errors import HelixError
from helix_compiler.kernels import triton_activation as TAct
from helix_compiler.kernels.triton_attention import interpreting

HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (1e-2, 1e-2),
       torch.float16: (2e-3, 2e-3)}


@pytest.fixture
def interpret():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not interpreting():
        pytest.skip("runs in the TRITON_INTERPRET=1 child "
                    "(test_activation_kernels_run_in_child_process)")


def test_activation_kernels_run_in_child_process():
    run_interp_tests_in_child(__file__, expected_min=11)


def _inputs(shape, dtype, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
            .requires_grad_() for _ in range(n)]


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# 3*7*45 = 945 elements: one partial 1024-block; 2*600*5 = 6000: several blocks and a tail.
SHAPES = [(3, 7, 45), (2, 600, 5)]


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_bias_gelu_matches_torch(interpret, approximate, with_bias, dtype):
    shape = SHAPES[0] if dtype == torch.float32 else SHAPES[1]
    x, dy = _inputs(shape, dtype, 2)
    bias = _inputs(shape[-1:], dtype, 1, seed=1)[0] if with_bias else None
    y = TAct.bias_gelu(x, bias, approximate, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    grads = torch.autograd.grad(y, [x] + ([bias] if with_bias else []), dy.detach())
    # reference: torch in float64 from the same (rounded) inputs
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    y64 = F.gelu(x64 + b64 if with_bias else x64, approximate=approximate)
    want = torch.autograd.grad(y64, [x64] + ([b64] if with_bias else []), dy.detach().double())
    _close(y, y64, dtype, f"gelu[{approximate}] y")
    _close(grads[0], want[0], dtype, f"gelu[{approximate}] dx")
    if with_bias:
        # dbias sums len(rows) terms: tolerance grows with them
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(grads[1].double(), want[1], rtol=rtol * 10,
                                   atol=atol * 10 * x.numel() ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interp_silu_mul_matches_torch(interpret, dtype):
    gate, up, dy = _inputs(SHAPES[1], dtype, 3, seed=2)
    y = TAct.silu_mul(gate, up, backend="triton")
    dg, du = torch.autograd.grad(y, (gate, up), dy.detach())
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    y64 = F.silu(g64) * u64
    wg, wu = torch.autograd.grad(y64, (g64, u64), dy.detach().double())
    _close(y, y64, dtype, "silu*up y")
    _close(dg, wg, dtype, "silu*up dgate")
    _close(du, wu, dtype, "silu*up dup")


def test_interp_saves_inputs_not_outputs(interpret):
    """The Function keeps x and bias for backward (recomputes gelu'), nothing [s, ffn]-extra."""
    x = torch.randn(4, 33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        TAct.bias_gelu(x, b, "tanh", backend="triton").sum().backward()
    assert len(saved) == 2 and saved[0].shape == x.shape and saved[1].shape == b.shape


def test_auto_backend_on_cpu_is_torch_and_bitwise():
    x = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    assert TAct.resolve_backend(x, None) == "torch"
    torch.testing.assert_close(TAct.bias_gelu(x, b), F.gelu(x + b, approximate="tanh"),
                               rtol=0, atol=0)
    torch.testing.assert_close(TAct.bias_gelu(x, b, "none"), F.gelu(x + b), rtol=0, atol=0)
    torch.testing.assert_close(TAct.silu_mul(x, x * 2), F.silu(x) * (x * 2), rtol=0, atol=0)


def test_bad_arguments_raise(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(HelixError, match="approximate='exact'"):
        TAct.bias_gelu(x, None, "exact")
    with pytest.raises(HelixError, match=r"bias\(7,\) must be \[8\]"):
        TAct.bias_gelu(x, torch.randn(7))
    with pytest.raises(HelixError, match="differ"):
        TAct.silu_mul(x, torch.randn(2, 9))
    with pytest.raises(HelixError, match="unknown"):
        TAct.bias_gelu(x, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(HelixError, match="TRITON_INTERPRET=1"):
        TAct.silu_mul(x, x, backend="triton")

