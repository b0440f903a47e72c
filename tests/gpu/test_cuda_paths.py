"""CUDA paths: attention backends, fused activations and chunked MLP on a GPU (skipped
without one). The CPU twins of these tests, and the helpers they share, live in
``tests/single``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_activation_kernels import _close, _inputs
from test_attention_backends import assert_matches, make_inputs, reference, run_backend
from test_mlp_chunk import assert_same, exported

from helix_compiler.kernels import attention as A
from helix_compiler.kernels import triton_activation as TAct
from helix_compiler.passes.mlp_chunk import chunk_mlp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["aten", "flash_attn", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_match_reference(no_forced_backend, backend, dtype, d, causal):
    cuda = torch.device("cuda")
    be = A.BACKENDS[backend]
    reason = be.reason_unusable(cuda, dtype, d)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    q, k, v, dout = make_inputs(2, 8, 2, 300, 300, d, dtype, seed=5)
    q, k, v, dout = (x.cuda() for x in (q, k, v, dout))
    got = run_backend(be.forward, be.backward, q, k, v, dout, causal, d ** -0.5)
    want = reference(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal, d ** -0.5)
    # fp32 through tensor cores (efficient op) may use tf32-free math; keep fp16-level slack.
    tol_dtype = torch.float16 if dtype == torch.float32 else dtype
    assert_matches([x.cpu() for x in got], want, tol_dtype, f"{backend} cuda {dtype} d={d}")


def test_cuda_op_autograd_default_backend(no_forced_backend):
    q, k, v, dout = (x.cuda() for x in make_inputs(1, 4, 4, 129, 129, 64, torch.bfloat16))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.helix.attention(q, k, v, causal=True, scale=0.125)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = reference(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), True, 0.125)
    assert_matches([x.cpu() for x in (out, lse, *grads)], want, torch.bfloat16, "cuda default")


@pytest.mark.parametrize("backend", ["aten", "flash_attn", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal, window", [(True, (0, 0)), (True, (1, 0)), (True, (63, 0)),
                                            (True, (200, -1)), (False, (17, 40))])
def test_cuda_backends_window_match_reference(no_forced_backend, backend, dtype, causal, window):
    """Sliding windows on CUDA: aten (torch's _flash_attention_forward with window_size for
    fp16/bf16, the blockwise path for fp32), flash-attn's window_size, Triton's band loops."""
    cuda = torch.device("cuda")
    be = A.BACKENDS[backend]
    reason = be.reason_unusable(cuda, dtype, 64)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    q, k, v, dout = (x.cuda() for x in make_inputs(2, 8, 2, 300, 300, 64, dtype, seed=6))
    got = run_backend(be.forward, be.backward, q, k, v, dout, causal, 0.125, window)
    want = reference(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal, 0.125, window)
    tol_dtype = torch.float16 if dtype == torch.float32 else dtype
    assert_matches([x.cpu() for x in got], want, tol_dtype, f"{backend} cuda {dtype} window={window}")


def test_cuda_op_window_autograd_default_backend(no_forced_backend):
    q, k, v, dout = (x.cuda() for x in make_inputs(1, 4, 2, 257, 257, 64, torch.bfloat16, seed=7))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.helix.attention(q, k, v, causal=True, scale=0.125, window=[31, 0])
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = reference(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), True, 0.125, (31, 0))
    assert_matches([x.cpu() for x in (out, lse, *grads)], want, torch.bfloat16, "cuda window default")


@pytest.mark.parametrize("backend", ["aten", "flash_attn", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, [31, 0]])
def test_cuda_document_masking_matches_the_per_document_reference(backend, dtype, window):
    """Packed documents on CUDA (flash-attn varlen, Triton's document mask, aten's per-document
    loop) equal the CPU float64 op run document by document."""
    if A.BACKENDS[backend].reason_unusable(torch.device("cuda"), dtype, 64) is not None:
        pytest.skip(f"{backend}: {A.BACKENDS[backend].reason_unusable(torch.device('cuda'), dtype, 64)}")
    q, k, v, dout = make_inputs(2, 4, 2, 300, 300, 64, dtype, seed=11)
    lengths = [[100, 37, 163], [1, 250, 49]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    doc = torch.ops.helix.document_ids(pos, None, None)
    A.set_attention_backend(backend)
    try:
        qc, kc, vc = (x.cuda().requires_grad_() for x in (q, k, v))
        out, lse = torch.ops.helix.attention(qc, kc, vc, doc.cuda(), causal=True, scale=0.125, window=window)
        grads = torch.autograd.grad(out, (qc, kc, vc), dout.cuda())
    finally:
        A.set_attention_backend(None)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = torch.ops.helix.attention(qd, kd, vd, doc, causal=True, scale=0.125, window=window)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    assert_matches([x.cpu() for x in (out, lse, *grads)], (ref_out.detach(), ref_lse, *ref_grads), dtype,
                   f"{backend} cuda {dtype} documents window={window}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_activations_match_torch(dtype):
    x, dy = (t.detach().cuda().requires_grad_() for t in _inputs((4, 1000, 257), dtype, 2))
    b = torch.randn(257, device="cuda", dtype=dtype, requires_grad=True)
    assert TAct.resolve_backend(x, None) == "triton"
    for approximate in ("tanh", "none"):
        y = TAct.bias_gelu(x, b, approximate)
        y_ref = F.gelu(x.double() + b.double(), approximate=approximate)
        _close(y, y_ref, dtype, f"cuda gelu[{approximate}]")
        gx, gb = torch.autograd.grad(y, (x, b), dy)
        rx, rb = torch.autograd.grad(y_ref, (x, b), dy.double())
        _close(gx, rx, dtype, "cuda gelu dx")
    y = TAct.silu_mul(x, dy)
    _close(y, F.silu(x.double()) * dy.double(), dtype, "cuda silu*up")


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_cuda_fused_activation_in_chunks(kind):
    ref, x = exported(kind, torch.float32)
    gm, _ = exported(kind, torch.float32)
    chunk_mlp(gm, num_chunks=3)  # activation_backend=None: Triton on CUDA
    assert_same(ref.cuda(), gm.cuda(), x.cuda(), bitwise=False, param_rtol=2e-5)

