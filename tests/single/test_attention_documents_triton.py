"""Document masking (``doc_ids``) in the Triton and flash-attn backends of ``helix::attention``.

Triton kernels run on CPU in Triton's interpreter: the tests whose names contain ``interp``
run in-process only when ``TRITON_INTERPRET=1`` was set before triton was first imported, and
are otherwise run by ``test_triton_document_kernels_run_in_child_process`` in a child pytest
(the pattern of ``test_attention_backends.py``). flash-attn cannot run here: its varlen path is
checked through a stand-in interface (per-document float64 attention over the flattened
tokens, in the lse layouts of flash-attn >= 2.6 and < 2.6), and the pure-torch helpers
(``documents.document_bounds`` etc., lse layout conversions) directly.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from interp_child import run_interp_tests_in_child
from test_attention_backends import _CustomOpLike
from test_attention_backends import keep_mask as band_keep

from helix_compiler.errors import HelixError
from helix_compiler.kernels import documents as DOCS
from helix_compiler.kernels import flash_attn_backend as FA
from helix_compiler.kernels import triton_attention as TA

HAS_TRITON = importlib.util.find_spec("triton") is not None


# --- reference ---------------------------------------------------------------------------------
def doc_ids_from_lengths(*rows: list[int], dtype=torch.int64) -> torch.Tensor:
    """``[batch, seq]`` ids, one row per list of document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                        for r in rows]).to(dtype)


def keep_mask(doc_ids, causal, window=None):
    """Bool ``[b, s, s]``: query i sees key j (same document, causal, window (left, right))."""
    s = doc_ids.shape[1]
    return band_keep(s, s, causal, window)[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])


def reference(q, k, v, dout, causal, scale, window, doc_ids):
    """float64 dense attention with an explicit keep mask: out, lse, dq, dk, dv."""
    g = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = q64 @ k64.repeat_interleave(g, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~keep_mask(doc_ids.cpu(), causal, window)[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v64.repeat_interleave(g, 1)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def make_inputs(b, h, hkv, s, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return rnd(b, h, s, d), rnd(b, hkv, s, d), rnd(b, hkv, s, d), rnd(b, h, s, d)


def assert_matches(got, want, atol, what):
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        assert g.shape == w.shape, f"{what}: {name} shape {tuple(g.shape)} != {tuple(w.shape)}"
        tol = atol * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=atol,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


def run(forward, backward, q, k, v, dout, causal, scale, window=None, doc_ids=None, **kw):
    w = () if window is None else (window,)
    d = {} if doc_ids is None else {"doc_ids": doc_ids}
    out, lse = forward(q, k, v, causal, scale, *w, **d, **kw)
    dq, dk, dv = backward(dout, q, k, v, out, lse, causal, scale, *w, **d, **kw)
    return out, lse, dq, dk, dv


# three documents of different lengths per row, boundaries differing between the rows
DOCS_37 = ([5, 20, 12], [17, 3, 17])


@pytest.fixture
def interpret():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not TA.interpreting():
        pytest.skip("runs in the TRITON_INTERPRET=1 child "
                    "(test_triton_document_kernels_run_in_child_process)")


# --- Triton (interpreter) ------------------------------------------------------------------------
@pytest.mark.parametrize("causal, window, ids", [
    (True, None, "int64"),
    (True, (5, 0), "int32-strided"),  # doc_ids a non-contiguous int32 view
    (False, (3, 5), "int64"),
])
def test_interp_triton_documents_match_reference(interpret, causal, window, ids):
    q, k, v, dout = make_inputs(2, 4, 2, 37, 16)
    doc_ids = doc_ids_from_lengths(*DOCS_37)
    if ids == "int32-strided":
        doc_ids = doc_ids.to(torch.int32).repeat_interleave(2, 1)[:, ::2]
        assert not doc_ids.is_contiguous()
    got = run(TA.triton_attention_forward, TA.triton_attention_backward,
              q, k, v, dout, causal, 0.3, window, doc_ids)
    assert_matches(got, reference(q, k, v, dout, causal, 0.3, window, doc_ids), 1e-4,
                   f"triton docs causal={causal} window={window}")


def test_interp_triton_documents_block_shapes(interpret):
    """BLOCK_M != BLOCK_N in every kernel (the document bounds are rounded to the loop's block);
    a one-token document and documents crossing several blocks."""
    cfg = TA.BlockConfig(16, 32, 32, 16, 16, 32, num_warps=1, num_stages=1)
    q, k, v, dout = make_inputs(2, 2, 1, 45, 16, seed=3)
    doc_ids = doc_ids_from_lengths([1, 33, 11], [20, 25])
    for causal, window in ((True, None), (True, (9, 0))):
        got = run(TA.triton_attention_forward, TA.triton_attention_backward,
                  q, k, v, dout, causal, 0.3, window, doc_ids, config=cfg)
        assert_matches(got, reference(q, k, v, dout, causal, 0.3, window, doc_ids), 1e-4,
                       f"triton docs {cfg} window={window}")


def test_interp_triton_one_document_equals_no_documents(interpret):
    q, k, v, dout = make_inputs(2, 4, 2, 37, 16, seed=1)
    one = torch.zeros(2, 37, dtype=torch.int64)
    for window in (None, (5, 0)):
        plain = run(TA.triton_attention_forward, TA.triton_attention_backward,
                    q, k, v, dout, True, 0.3, window)
        docs = run(TA.triton_attention_forward, TA.triton_attention_backward,
                   q, k, v, dout, True, 0.3, window, one)
        for a, b in zip(docs, plain, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_interp_triton_documents_skip_other_blocks(interpret):
    """Documents on 16-token block boundaries: blocks of other documents are never loaded, so
    NaNs in one document's q/k/v/dout leave the others exactly as without them (a masked but
    loaded NaN would poison its block through the 0 * NaN of the P @ V / dS @ K products)."""
    q, k, v, dout = make_inputs(1, 2, 1, 40, 16, seed=2)
    doc_ids = doc_ids_from_lengths([16, 16, 8])
    clean = run(TA.triton_attention_forward, TA.triton_attention_backward,
                q, k, v, dout, False, 0.3, None, doc_ids)
    for lo, hi in ((0, 16), (16, 32), (32, 40)):
        poisoned = [x.clone() for x in (q, k, v, dout)]
        for x in poisoned:
            x[:, :, lo:hi] = float("nan")
        got = run(TA.triton_attention_forward, TA.triton_attention_backward,
                  *poisoned, False, 0.3, None, doc_ids)
        others = torch.ones(40, dtype=torch.bool)
        others[lo:hi] = False
        for name, g, c in zip(["out", "lse", "dq", "dk", "dv"], got, clean, strict=True):
            torch.testing.assert_close(g[:, :, others], c[:, :, others], atol=0, rtol=0,
                                       msg=lambda m, n=name, a=lo: f"NaN doc at {a}: {n}: {m}")


def test_triton_documents_reject_bad_ids():
    q, k, v, _ = make_inputs(1, 2, 2, 8, 16)
    with pytest.raises(HelixError, match="expected"):
        TA.triton_attention_forward(q, k, v, True, 0.3, doc_ids=torch.zeros(1, 7, dtype=torch.int64))
    with pytest.raises(HelixError, match="int32 or int64"):
        TA.triton_attention_forward(q, k, v, True, 0.3, doc_ids=torch.zeros(1, 8))


def test_triton_document_kernels_run_in_child_process():
    run_interp_tests_in_child(__file__, expected_min=6)


# --- pure-torch helpers ----------------------------------------------------------------------------
def test_document_bounds_and_spans():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]], dtype=torch.int32)
    cu, max_seqlen = DOCS.document_bounds(doc_ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 7, 12] and max_seqlen == 5
    start, end = DOCS.document_spans(doc_ids)
    assert start.tolist() == [[0, 0, 0, 3, 3, 5], [0, 1, 1, 1, 1, 1]]
    assert end.tolist() == [[3, 3, 3, 5, 5, 6], [1, 6, 6, 6, 6, 6]]
    doc, offset = DOCS.token_documents(doc_ids)
    assert doc.tolist() == [0, 0, 0, 1, 1, 2, 3, 4, 4, 4, 4, 4]
    assert offset.tolist() == [0, 1, 2, 0, 1, 0, 0, 0, 1, 2, 3, 4]
    # one document per row: cu_seqlens are the row starts
    cu, max_seqlen = DOCS.document_bounds(torch.zeros(3, 4, dtype=torch.int64))
    assert cu.tolist() == [0, 4, 8, 12] and max_seqlen == 4
    # every token its own document
    cu, max_seqlen = DOCS.document_bounds(torch.arange(5)[None])
    assert cu.tolist() == list(range(6)) and max_seqlen == 1
    # empty
    cu, max_seqlen = DOCS.document_bounds(torch.zeros(2, 0, dtype=torch.int64))
    assert cu.tolist() == [0] and max_seqlen == 0


def test_document_bounds_random_against_python():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        cuts = sorted(torch.randperm(29, generator=gen)[:3].add(1).tolist())
        rows.append([b - a for a, b in zip([0, *cuts], [*cuts, 30], strict=True)])
    doc_ids = doc_ids_from_lengths(*rows)
    cu, max_seqlen = DOCS.document_bounds(doc_ids)
    want = [0]
    for r, lengths in enumerate(rows):
        for n in lengths:
            want.append(want[-1] + n)
        assert want[-1] == 30 * (r + 1)
    assert cu.tolist() == want and max_seqlen == max(max(r) for r in rows)
    start, end = DOCS.document_spans(doc_ids)
    for r in range(4):
        for i in range(30):
            same = (doc_ids[r] == doc_ids[r, i]).nonzero().flatten()
            assert (start[r, i].item(), end[r, i].item()) == (same.min().item(), same.max().item() + 1)


def test_lse_layout_conversions():
    doc_ids = doc_ids_from_lengths(*DOCS_37)
    b, h, s = 2, 3, 37
    lse = torch.randn(b, h, s)
    cu, max_seqlen = DOCS.document_bounds(doc_ids)
    n = cu.numel() - 1
    # >= 2.6: [h, total]
    flat = FA.helix_lse_to_varlen(lse, doc_ids, n, max_seqlen, unpadded=True)
    assert flat.shape == (h, b * s) and flat.is_contiguous()
    torch.testing.assert_close(flat[:, 37 + 4], lse[1, :, 4])
    back = FA.varlen_lse_to_helix(flat, doc_ids)
    assert back.is_contiguous()
    torch.testing.assert_close(back, lse, atol=0, rtol=0)
    # < 2.6: [num_docs, h, max_seqlen], document d's token t at [d, :, t]
    padded = FA.helix_lse_to_varlen(lse, doc_ids, n, max_seqlen, unpadded=False)
    assert padded.shape == (6, h, 20)
    torch.testing.assert_close(padded[1, :, 3], lse[0, :, 5 + 3])  # row 0, document 1
    torch.testing.assert_close(padded[5, :, 16], lse[1, :, 36])  # row 1's last token
    padded[4, :, 3:] = float("nan")  # padding (document 4 has 3 tokens) is never read
    torch.testing.assert_close(FA.varlen_lse_to_helix(padded, doc_ids), lse, atol=0, rtol=0)


# --- flash-attn varlen: plumbing through a stand-in interface --------------------------------------
def _varlen_reference(q, k, v, cu, max_seqlen, causal, scale, window):
    """Per-document float64 attention over flattened [total, h, d] tokens."""
    assert cu.dtype == torch.int32 and q.stride(-1) == 1 and q.shape[-1] % 8 == 0
    starts = cu.tolist()
    assert max(b - a for a, b in zip(starts[:-1], starts[1:], strict=True)) == max_seqlen
    g = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        qd, kd, vd = (x[a:b].transpose(0, 1).double() for x in (q, k, v))
        kd, vd = kd.repeat_interleave(g, 0), vd.repeat_interleave(g, 0)
        s = qd @ kd.transpose(-1, -2) * scale
        s = s.masked_fill(~keep_mask(torch.zeros(1, b - a), causal, window)[0], float("-inf"))
        outs.append((torch.softmax(s, -1) @ vd).transpose(0, 1))
        lses.append(torch.logsumexp(s, -1))
    return outs, lses


def _fake_varlen_fwd_new(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p, softmax_scale, causal, window_size_left=-1,
                         window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None,
                         zero_tensors=False, num_splits=0):
    assert dropout_p == 0.0 and softcap == 0.0 and block_table is None
    assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
    _fake_varlen_fwd_new.windows.append((window_size_left, window_size_right))
    outs, lses = _varlen_reference(q, k, v, cu_seqlens_q, max_seqlen_q, causal, softmax_scale,
                                   (window_size_left, window_size_right))
    lse = torch.cat(lses, -1).float()  # [h, total]
    return torch.cat(outs).to(q.dtype), lse, torch.empty(0), torch.zeros(2)


_fake_varlen_fwd_new.windows = []


def _fake_varlen_bwd_new(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes,
                         deterministic, rng_state=None, zero_tensors=False):
    window = (window_size_left, window_size_right)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    outs, lses = _varlen_reference(qd, kd, vd, cu_seqlens_q, max_seqlen_q, causal,
                                   softmax_scale, window)
    if softmax_lse.dim() == 2:  # the layout of this stand-in's version
        assert softmax_lse.shape == (q.shape[1], q.shape[0]) and softmax_lse.is_contiguous()
        torch.testing.assert_close(softmax_lse.double(), torch.cat(lses, -1).detach(),
                                   atol=1e-5, rtol=1e-5)
    else:
        starts = cu_seqlens_q.tolist()
        assert softmax_lse.shape == (len(starts) - 1, q.shape[1], max_seqlen_q)
        for d, ref_lse in enumerate(lses):
            torch.testing.assert_close(softmax_lse[d, :, : ref_lse.shape[-1]].double(), ref_lse.detach(),
                                       atol=1e-5, rtol=1e-5)
    gq, gk, gv = torch.autograd.grad(torch.cat(outs), (qd, kd, vd), dout.double())
    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)
    return torch.empty(0)


def _fake_varlen_fwd_old(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                         return_softmax, block_table):
    """2.5.9's signature and results: 8 values, lse [num_docs, h, max_seqlen] padded."""
    out, lse, sm, rng = _fake_varlen_fwd_new(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, *window_size, 0.0, alibi_slopes, return_softmax, block_table)
    starts = cu_seqlens_q.tolist()
    padded = torch.full((len(starts) - 1, q.shape[1], max_seqlen_q), float("nan"))
    for d, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        padded[d, :, : b - a] = lse[:, a:b]
    return out, q, k, v, out, padded, sm, rng


def _fake_varlen_bwd_old(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                         window_size, alibi_slopes, deterministic, rng_state=None):
    assert softmax_lse.dim() == 3, "flash-attn < 2.6 reads the padded varlen lse"
    _fake_varlen_bwd_new(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                         cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                         causal, *window_size, 0.0, alibi_slopes, deterministic, rng_state)
    return dq, dk, dv, torch.empty(0)


def _fake(api):
    if api == "2.7+custom_op":
        return SimpleNamespace(_flash_attn_varlen_forward=_CustomOpLike(_fake_varlen_fwd_new),
                               _flash_attn_varlen_backward=_CustomOpLike(_fake_varlen_bwd_new))
    return SimpleNamespace(_flash_attn_varlen_forward=_fake_varlen_fwd_old,
                           _flash_attn_varlen_backward=_fake_varlen_bwd_old)


@pytest.mark.parametrize("api", ["2.7+custom_op", "2.5"])
@pytest.mark.parametrize("causal, window", [(True, None), (True, (5, 0)), (False, (3, 5))])
def test_flash_attn_documents_with_stand_in(api, causal, window):
    """GQA, head dim 12 (padded to 16 and sliced back), documents differing per row."""
    fake = _fake(api)
    q, k, v, dout = make_inputs(2, 4, 2, 37, 12, torch.float64, seed=5)
    doc_ids = doc_ids_from_lengths(*DOCS_37)
    got = run(lambda *a, **kw: FA.flash_attn_forward(*a, interface=fake, **kw),
              lambda *a, **kw: FA.flash_attn_backward(*a, interface=fake, **kw),
              q, k, v, dout, causal, 0.3, window, doc_ids)
    assert got[1].shape == (2, 4, 37) and got[1].dtype == torch.float32 and got[1].is_contiguous()
    assert_matches(got, reference(q, k, v, dout, causal, 0.3, window, doc_ids), 2e-5,
                   f"flash_attn varlen {api} window={window}")


def test_flash_attn_one_token_documents_use_a_zero_window():
    """Every document one token long: a (0, 0) window keeps flash-attn off its seqlen_q == 1
    GQA path, and each token attends to itself."""
    fake = _fake("2.7+custom_op")
    _fake_varlen_fwd_new.windows.clear()
    q, k, v, dout = make_inputs(1, 4, 2, 6, 16, torch.float64, seed=7)
    doc_ids = torch.arange(6)[None]
    got = run(lambda *a, **kw: FA.flash_attn_forward(*a, interface=fake, **kw),
              lambda *a, **kw: FA.flash_attn_backward(*a, interface=fake, **kw),
              q, k, v, dout, True, 0.3, None, doc_ids)
    assert _fake_varlen_fwd_new.windows[0] == (0, 0)
    assert_matches(got, reference(q, k, v, dout, True, 0.3, None, doc_ids), 2e-5, "one-token docs")
    torch.testing.assert_close(got[0], v.repeat_interleave(2, 1))
