"""Attention backends of ``helix::attention`` against a float64 reference (out, lse, dq, dk, dv).

The Triton kernels run on CPU in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
before triton is first imported (triton's own ``tl.sum``/``tl.max`` are jit-wrapped at import).
In one pytest process other modules may import triton first, so the interpreter tests (names
containing ``interp``) run in-process only when the interpreter is already active, and are
otherwise run by ``test_triton_kernels_run_in_child_process`` in a child pytest with the
variable set from the start.
CUDA-only paths (aten flash/efficient ops, flash-attn, compiled Triton) are marked ``gpu``;
their Python plumbing is checked here on meta tensors and with a stand-in flash-attn module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from interp_child import run_interp_tests_in_child

from helix_compiler.errors import HelixError
from helix_compiler.kernels import attention as A
from helix_compiler.kernels import flash_attn_backend as FA
from helix_compiler.kernels import triton_attention as TA

HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = {  # (atol, rtol) against the float64 reference, for out / lse / grads
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 2e-2),
}


# --- reference ---------------------------------------------------------------------------------
def keep_mask(sq, sk, causal, window=None):
    """Bool [sq, sk]: query i sees key j (top-left causal; window (left, right), -1 = unbounded)."""
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= i - j <= left
        if right >= 0:
            keep &= j - i <= right
    return keep


def reference(q, k, v, dout, causal, scale, window=None):
    """float64 attention (top-left causal as SDPA, optional window): out, lse, dq, dk, dv."""
    g = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = q64 @ k64.repeat_interleave(g, 1).transpose(-1, -2) * scale
    if causal or window is not None:
        s = s.masked_fill(~keep_mask(q.shape[2], k.shape[2], causal, window), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v64.repeat_interleave(g, 1)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def make_inputs(b, h, hkv, sq, sk, d, dtype, *, transposed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    if transposed:  # [b, s, h, d] storage viewed as [b, h, s, d]: non-contiguous inputs
        q = rnd(b, sq, h, d).transpose(1, 2)
    else:
        q = rnd(b, h, sq, d)
    k, v, dout = rnd(b, hkv, sk, d), rnd(b, hkv, sk, d), rnd(b, h, sq, d)
    return q, k, v, dout


def assert_matches(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    names = ["out", "lse", "dq", "dk", "dv"]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, f"{what}: {name} shape {tuple(g.shape)} != {tuple(w.shape)}"
        # Gradients sum O(seq) terms: scale the tolerance by the reference magnitude.
        tol_scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, atol=atol * tol_scale, rtol=rtol,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


def run_backend(forward, backward, q, k, v, dout, causal, scale, window=None):
    w = () if window is None else (window,)
    out, lse = forward(q, k, v, causal, scale, *w)
    dq, dk, dv = backward(dout, q, k, v, out, lse, causal, scale, *w)
    return out, lse, dq, dk, dv


# (causal, window) cases every backend runs: left 0 (diagonal only), 1, 7, one larger than the
# sequence (same as causal), a causal window with right=-1, and a two-sided non-causal one.
WINDOWS = [(True, (0, 0)), (True, (1, 0)), (True, (7, 0)), (True, (1000, 0)), (True, (7, -1)),
           (False, (3, 5))]


@pytest.fixture
def interpret(no_forced_backend):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not TA.interpreting():
        pytest.skip("runs in the TRITON_INTERPRET=1 child (test_triton_kernels_run_in_child_process)")


# --- Triton (interpreter) ------------------------------------------------------------------------
# (b, h, hkv, sq, sk, d): sequence lengths deliberately not multiples of the 16-wide blocks.
GQA_SHAPE = (1, 4, 2, 37, 37, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_interp_triton_matches_reference(interpret, dtype, causal):
    q, k, v, dout = make_inputs(*GQA_SHAPE, dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    got = run_backend(TA.triton_attention_forward, TA.triton_attention_backward,
                      q, k, v, dout, causal, scale)
    assert got[1].dtype == (torch.float32 if dtype != torch.float32 else dtype)
    assert all(x.dtype == dtype for x in (got[0], got[2], got[3], got[4]))
    assert_matches(got, reference(q, k, v, dout, causal, scale), dtype,
                   f"triton {dtype} causal={causal}")


@pytest.mark.parametrize("shape, dtype, causal, transposed, config", [
    # head dim 64, MQA (one K/V head), non-contiguous q
    ((1, 4, 1, 24, 24, 64), torch.bfloat16, True, True, None),
    # head dim 128, one block tail
    ((1, 2, 2, 17, 17, 128), torch.float32, False, False, None),
    # head dim not a power of two, seq_q != seq_k (top-left causal), batch 2
    ((2, 3, 1, 20, 33, 24), torch.float16, True, False, None),
    ((1, 2, 2, 40, 17, 32), torch.float32, True, False, None),
    # BLOCK_M != BLOCK_N in every kernel (causal block bounds)
    ((1, 2, 1, 45, 45, 16), torch.float32, True, False,
     TA.BlockConfig(16, 32, 32, 16, 16, 32, num_warps=1, num_stages=1)),
])
def test_interp_triton_shapes(interpret, shape, dtype, causal, transposed, config):
    q, k, v, dout = make_inputs(*shape, dtype, transposed=transposed, seed=1)
    scale = 0.3
    fwd = lambda *a: TA.triton_attention_forward(*a, config=config)
    bwd = lambda *a: TA.triton_attention_backward(*a, config=config)
    got = run_backend(fwd, bwd, q, k, v, dout, causal, scale)
    assert_matches(got, reference(q, k, v, dout, causal, scale), dtype, f"triton {shape}")


@pytest.mark.parametrize("causal, window", WINDOWS)
def test_interp_triton_window_matches_reference(interpret, causal, window):
    """Windows across several 16-wide blocks (some rows' first key block is fully masked)."""
    q, k, v, dout = make_inputs(1, 4, 2, 45, 45, 16, torch.float32, seed=6)
    got = run_backend(TA.triton_attention_forward, TA.triton_attention_backward,
                      q, k, v, dout, causal, 0.3, window)
    assert_matches(got, reference(q, k, v, dout, causal, 0.3, window), torch.float32,
                   f"triton window={window} causal={causal}")


def test_interp_triton_window_bf16_and_block_shapes(interpret):
    cfg = TA.BlockConfig(16, 32, 32, 16, 16, 32, num_warps=1, num_stages=1)
    q, k, v, dout = make_inputs(1, 2, 1, 50, 50, 24, torch.bfloat16, seed=7)
    got = run_backend(lambda *a: TA.triton_attention_forward(*a, config=cfg),
                      lambda *a: TA.triton_attention_backward(*a, config=cfg),
                      q, k, v, dout, True, 0.2, (20, 0))
    assert_matches(got, reference(q, k, v, dout, True, 0.2, (20, 0)), torch.bfloat16, "triton bf16 window")


def test_interp_op_dispatches_to_forced_triton(interpret, monkeypatch):
    """torch.ops.helix.attention + autograd, backend forced by the environment variable."""
    monkeypatch.setenv(A.ENV_VAR, "triton")
    assert A.select_backend(torch.device("cpu"), torch.float32, 16).name == "triton"
    calls = []
    be = A.BACKENDS["triton"]
    def count(fn, tag):
        def wrapped(*args):
            calls.append(tag)
            return fn(*args)
        return wrapped
    monkeypatch.setitem(A.BACKENDS, "triton", dataclasses.replace(
        be, forward=count(be.forward, "fwd"), backward=count(be.backward, "bwd")))
    q, k, v, dout = make_inputs(1, 4, 2, 19, 19, 16, torch.float32, seed=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.helix.attention(q, k, v, causal=True, scale=0.25)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert calls == ["fwd", "bwd"]
    assert_matches((out, lse, dq, dk, dv), reference(q, k, v, dout, True, 0.25), torch.float32,
                   "helix::attention[triton]")
    # Same result as the aten CPU backend through the same op.
    monkeypatch.setenv(A.ENV_VAR, "aten")
    out2, lse2 = torch.ops.helix.attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out2, out.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse2, lse, atol=2e-5, rtol=2e-5)


def test_triton_kernels_run_in_child_process():
    run_interp_tests_in_child(__file__, expected_min=20)


# --- aten CPU --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_aten_cpu_matches_reference(no_forced_backend, dtype, causal):
    q, k, v, dout = make_inputs(2, 4, 2, 37, 37, 16, dtype, seed=3)
    got = run_backend(A._aten_forward, A._aten_backward, q, k, v, dout, causal, 0.2)
    assert_matches(got, reference(q, k, v, dout, causal, 0.2), dtype, f"aten cpu {dtype}")
    assert A.select_backend(torch.device("cpu"), dtype, 16).name == "aten"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal, window", WINDOWS)
def test_aten_cpu_window_matches_reference(no_forced_backend, dtype, causal, window):
    q, k, v, dout = make_inputs(2, 4, 2, 37, 37, 16, dtype, seed=3)
    got = run_backend(A._aten_forward, A._aten_backward, q, k, v, dout, causal, 0.2, window)
    assert got[1].dtype == dtype
    assert_matches(got, reference(q, k, v, dout, causal, 0.2, window), dtype,
                   f"aten cpu {dtype} window={window} causal={causal}")


@pytest.mark.parametrize("shape, dtype, window", [
    ((1, 4, 1, 300, 300, 16), torch.float64, (40, 0)),  # MQA, several 128-row blocks
    ((1, 2, 2, 300, 300, 8), torch.float64, (129, 0)),  # the band crosses a block edge
    ((1, 4, 2, 150, 150, 16), torch.bfloat16, (7, 0)),  # half: computed in fp32, lse fp32
])
def test_aten_cpu_window_blockwise_shapes(no_forced_backend, shape, dtype, window):
    q, k, v, dout = make_inputs(*shape, dtype, seed=8)
    got = run_backend(A._aten_forward, A._aten_backward, q, k, v, dout, True, 0.25, window)
    assert got[1].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert got[0].dtype == dtype and got[3].dtype == dtype
    assert_matches(got, reference(q, k, v, dout, True, 0.25, window), dtype, f"blockwise {shape}")


def test_aten_cpu_window_lse_consistent_with_the_no_window_path(no_forced_backend):
    """A window wider than the sequence is the causal op itself; a window exactly as wide as
    the sequence, run through the blockwise path, gives the same out and lse."""
    q, k, v, _ = make_inputs(1, 2, 2, 40, 40, 16, torch.float64, seed=9)
    plain = A._aten_forward(q, k, v, True, 0.3)
    for left in (39, 1000):
        torch.testing.assert_close(A._aten_forward(q, k, v, True, 0.3, (left, 0)), plain, atol=1e-13, rtol=0)
    blk = A.blockwise_forward(q, k, v, True, 0.3, (39, -1))
    torch.testing.assert_close(blk, plain, atol=1e-13, rtol=0)


def test_op_window_argument_and_autograd(no_forced_backend):
    """torch.ops.helix.attention(..., window=[l, r]): forward + autograd equal the reference;
    no window / [-1, -1] / a window wider than the sequence are the causal op."""
    q, k, v, dout = make_inputs(1, 4, 2, 33, 33, 16, torch.float64, seed=10)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.helix.attention(q, k, v, causal=True, scale=0.25, window=[5, 0])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches((out, lse, dq, dk, dv), reference(q, k, v, dout, True, 0.25, (5, 0)), torch.float64,
                   "helix::attention window=[5, 0]")
    plain = torch.ops.helix.attention(q, k, v, causal=True, scale=0.25)
    for w in ([-1, -1], [32, 0], None):
        torch.testing.assert_close(torch.ops.helix.attention(q, k, v, causal=True, scale=0.25, window=w), plain)
    with pytest.raises(HelixError, match=r"window=\(-3, 0\)"):
        torch.ops.helix.attention(q, k, v, causal=True, scale=0.25, window=[-3, 0])


# --- aten CUDA: argument plumbing on meta tensors (schemas, shapes, lse slicing) -------------
@pytest.mark.parametrize("dtype, d, causal, sk", [
    (torch.bfloat16, 64, True, 100),   # flash op, GQA native
    (torch.float16, 60, False, 100),   # flash op, head dim padded to 64 and sliced back
    (torch.float32, 128, True, 100),   # efficient op, lse padded to 128 and sliced to 100
    (torch.bfloat16, 64, True, 80),    # causal seq_q != seq_k: efficient op (top-left)
])
def test_aten_cuda_plumbing_on_meta(dtype, d, causal, sk):
    q = torch.empty(2, 4, 100, d, device="meta", dtype=dtype)
    k = torch.empty(2, 2, sk, d, device="meta", dtype=dtype)
    assert A._aten_cuda_uses_flash(q, k, causal) == (dtype != torch.float32 and sk == 100)
    out, lse = A._aten_cuda_forward(q, k, k, causal, 0.125)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    dq, dk, dv = A._aten_cuda_backward(out, q, k, k, out, lse.contiguous(), causal, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


@pytest.mark.parametrize("dtype, sk, uses_flash", [
    (torch.bfloat16, 100, True),   # torch's _flash_attention_forward with window_size_left/right
    (torch.float16, 80, False),    # seq_q != seq_k: the blockwise path
    (torch.float32, 100, False),   # fp32: the blockwise path
])
def test_aten_cuda_window_plumbing_on_meta(dtype, sk, uses_flash):
    q = torch.empty(2, 4, 100, 60, device="meta", dtype=dtype)
    k = torch.empty(2, 2, sk, 60, device="meta", dtype=dtype)
    assert A._aten_cuda_window_uses_flash(q, k) == uses_flash
    if not uses_flash:
        return  # the blockwise path is the CPU-tested one
    out, lse = A._aten_cuda_window_forward(q, k, k, True, 0.125, (15, -1))
    assert out.shape == q.shape and lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    dq, dk, dv = A._aten_cuda_window_backward(out, q, k, k, out, lse, True, 0.125, (15, -1))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


# --- flash-attn: plumbing through a stand-in interface ------------------------------------------
def _fa_reference(q, k, v, causal, scale, window=(-1, -1)):
    """flash-attn semantics in its [b, s, h, d] layout (square causal / window)."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert q.shape[-1] % 8 == 0, "flash-attn needs head dims padded to a multiple of 8"
    qt, kt, vt = (x.transpose(1, 2).double() for x in (q, k, v))
    g = qt.shape[1] // kt.shape[1]
    kt, vt = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
    s = qt @ kt.transpose(-1, -2) * scale
    if causal or tuple(window) != (-1, -1):
        assert s.shape[-2] == s.shape[-1], "stand-in: square only (bottom-right == top-left)"
        s = s.masked_fill(~keep_mask(*s.shape[-2:], causal, tuple(window)), float("-inf"))
    return s, vt


def _fake_fwd_new(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                  window_size_right, softcap, alibi_slopes, return_softmax):
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
    s, vt = _fa_reference(q, k, v, causal, softmax_scale, (window_size_left, window_size_right))
    out = (torch.softmax(s, -1) @ vt).transpose(1, 2).to(q.dtype).contiguous()
    return out, torch.logsumexp(s, -1).float(), torch.empty(0), torch.zeros(2)


def _fake_bwd_new(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                  window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                  rng_state=None):
    assert dout.stride(-1) == 1 and out.stride(-1) == 1 and softmax_lse.dtype == torch.float32
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s, vt = _fa_reference(qd, kd, vd, causal, softmax_scale, (window_size_left, window_size_right))
    o = (torch.softmax(s, -1) @ vt).transpose(1, 2)
    gq, gk, gv = torch.autograd.grad(o, (qd, kd, vd), dout.double())
    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)  # GQA: dk/dv already reduced, [b, s, hkv, d]
    return torch.empty(0)


def _fake_fwd_old(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                  return_softmax):
    out, lse, sm, rng = _fake_fwd_new(q, k, v, dropout_p, softmax_scale, causal, *window_size, 0.0,
                                      alibi_slopes, return_softmax)
    return out, q, k, v, out, lse, sm, rng


def _fake_bwd_old(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, rng_state=None):
    _fake_bwd_new(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                  *window_size, 0.0, alibi_slopes, deterministic, rng_state)
    return dq, dk, dv, torch.empty(0)


class _CustomOpLike:
    """Mimics torch.library.custom_op's CustomOpDef: (*args, **kwargs) call, ``_init_fn``."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


@pytest.mark.parametrize("api", ["2.6+", "2.6+custom_op", "2.5"])
@pytest.mark.parametrize("d", [16, 12])  # 12: padded to 16 and sliced back
def test_flash_attn_plumbing_with_stand_in(api, d):
    if api == "2.6+":
        fake = SimpleNamespace(_flash_attn_forward=_fake_fwd_new, _flash_attn_backward=_fake_bwd_new)
    elif api == "2.6+custom_op":
        fake = SimpleNamespace(_flash_attn_forward=_CustomOpLike(_fake_fwd_new),
                               _flash_attn_backward=_CustomOpLike(_fake_bwd_new))
    else:
        fake = SimpleNamespace(_flash_attn_forward=_fake_fwd_old, _flash_attn_backward=_fake_bwd_old)
    q, k, v, dout = make_inputs(2, 4, 2, 21, 21, d, torch.float64, seed=4)
    fwd = lambda *a: FA.flash_attn_forward(*a, interface=fake)
    bwd = lambda *a: FA.flash_attn_backward(*a, interface=fake)
    got = run_backend(fwd, bwd, q, k, v, dout, True, 0.3)
    assert got[1].dtype == torch.float32  # flash-attn's lse is always fp32
    assert_matches(got, reference(q, k, v, dout, True, 0.3), torch.float32, f"flash_attn {api}")
    with pytest.raises(HelixError, match="bottom-right"):
        FA.flash_attn_forward(q, k[:, :, :7], v[:, :, :7], True, 0.3, interface=fake)


def _fake(api):
    if api == "2.6+":
        return SimpleNamespace(_flash_attn_forward=_fake_fwd_new, _flash_attn_backward=_fake_bwd_new)
    if api == "2.6+custom_op":
        return SimpleNamespace(_flash_attn_forward=_CustomOpLike(_fake_fwd_new),
                               _flash_attn_backward=_CustomOpLike(_fake_bwd_new))
    return SimpleNamespace(_flash_attn_forward=_fake_fwd_old, _flash_attn_backward=_fake_bwd_old)


@pytest.mark.parametrize("api", ["2.6+", "2.5"])
@pytest.mark.parametrize("causal, window", WINDOWS)
def test_flash_attn_window_with_stand_in(api, causal, window):
    """window=(left, right) reaches flash-attn as window_size_left/right (2.6+) or
    window_size (2.5); GQA, head dim 12 padded to 16."""
    fake = _fake(api)
    q, k, v, dout = make_inputs(2, 4, 2, 21, 21, 12, torch.float64, seed=11)
    got = run_backend(lambda *a: FA.flash_attn_forward(*a, interface=fake),
                      lambda *a: FA.flash_attn_backward(*a, interface=fake),
                      q, k, v, dout, causal, 0.3, window)
    assert_matches(got, reference(q, k, v, dout, causal, 0.3, window), torch.float32,
                   f"flash_attn {api} window={window}")
    with pytest.raises(HelixError, match=r"bottom-right.*window=\(1, 0\)"):
        FA.flash_attn_forward(q, k[:, :, :7], v[:, :, :7], False, 0.3, (1, 0), interface=fake)


# --- registry ------------------------------------------------------------------------------------------
def test_preference_order_and_capabilities(no_forced_backend):
    assert list(A.BACKENDS)[:3] == ["flash_attn", "aten", "triton"]
    cuda = torch.device("cuda")
    assert FA.unsupported(cuda, torch.float32, 64) is not None
    assert FA.unsupported(cuda, torch.bfloat16, 128) is None
    assert TA.unsupported(cuda, torch.float64, 64) is not None
    assert TA.unsupported(cuda, torch.float16, 128) is None
    if FA._interface() is None:  # CUDA without flash-attn: aten comes first
        assert A.select_backend(cuda, torch.bfloat16, 128).name == "aten"
        assert not A.BACKENDS["flash_attn"].available(cuda)


def test_unknown_backend_in_env_raises(no_forced_backend, monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "bogus")
    with pytest.raises(HelixError, match=r"HELIX_ATTENTION_BACKEND='bogus' is not a known.*aten"):
        A.select_backend(torch.device("cpu"))
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(HelixError, match="bogus"):
        torch.ops.helix.attention(q, q, q, causal=False, scale=1.0)


def test_set_unknown_backend_raises(no_forced_backend):
    with pytest.raises(HelixError, match="unknown attention backend 'bogus'"):
        A.set_attention_backend("bogus")


def test_forcing_unavailable_backend_raises(no_forced_backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    A.set_attention_backend("flash_attn")
    with pytest.raises(HelixError, match=r"'flash_attn' was forced but is not available on cpu"):
        A.select_backend(cpu, torch.float16, 64)
    A.set_attention_backend("triton")  # CPU without TRITON_INTERPRET=1
    with pytest.raises(HelixError, match=r"'triton' was forced but is not available on cpu.*aten"):
        A.select_backend(cpu, torch.float32, 64)
    A.set_attention_backend(None)
    monkeypatch.setenv(A.ENV_VAR, "flash_attn")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(HelixError, match="flash_attn"):
        torch.ops.helix.attention(q, q, q, causal=False, scale=1.0)


def test_interp_forcing_backend_with_unsupported_dtype_raises(interpret):
    A.set_attention_backend("triton")
    with pytest.raises(HelixError, match="limited to fp32/fp16/bf16, not torch.float64"):
        A.select_backend(torch.device("cpu"), torch.float64, 16)
    # automatic choice skips backends that cannot take the dtype
    A.set_attention_backend(None)
    assert A.select_backend(torch.device("cpu"), torch.float64, 16).name == "aten"


# --- GPU ---------------------------------------------------------------------------------------------
