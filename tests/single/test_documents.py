"""Packed documents, padding and token-weighted loss in one process: the document-id op, the
per-document attention path against a float64 dense reference, mask recognition (Hugging
Face's packed ``position_ids`` path, padding, an explicit block-diagonal mask) and what is
rejected, the batch checks, and the token-sum loss rewrite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helix_compiler import HelixError, UnsupportedModelError, compile_program  # noqa: E402
from helix_compiler.kernels.documents import document_runs  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, document_mask, hf_model  # noqa: E402
from helix_compiler.passes.segment import run_chain  # noqa: E402
from helix_compiler.runtime.batch_checks import check_documents  # noqa: E402

DOC_IDS = torch.ops.helix.document_ids.default


def _packed_positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def test_document_ids_from_each_input():
    pos = _packed_positions([[3, 2, 4], [5, 4]])
    doc = DOC_IDS(pos, None, None)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert doc.dtype == torch.int32
    # a jump that is not +1 starts a document too (Hugging Face: position_ids diff != 1)
    assert DOC_IDS(torch.tensor([[4, 5, 6, 9, 10]]), None, None).tolist() == [[0, 0, 0, 1, 1]]
    seg = torch.tensor([[7, 7, 3, 3, 3, 9]])
    assert DOC_IDS(None, seg, None).tolist() == [[0, 0, 1, 1, 1, 2]]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert DOC_IDS(None, None, mask).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    both = DOC_IDS(torch.tensor([[0, 1, 0, 1, 2]]), None, torch.tensor([[1, 1, 1, 1, 0]]))
    assert both.tolist() == [[0, 0, 1, 1, 2]]
    assert document_runs(doc) == [[(0, 3), (3, 5), (5, 9)], [(0, 5), (5, 9)]]


def _dense_reference(q, k, v, doc, causal, scale, left):
    s = q.shape[2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    keep = (doc[:, :, None] == doc[:, None, :])[:, None]
    if causal:
        keep = keep & (j <= i)
    if left is not None:
        keep = keep & (j >= i - left)
    g = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v.repeat_interleave(g, 1), scores.logsumexp(-1)


@pytest.mark.parametrize("left", [None, 3])
@pytest.mark.parametrize("same_rows", [False, True])
def test_per_document_attention_matches_dense_float64(left, same_rows):
    torch.manual_seed(0)
    b, h, hkv, s, d = 2, 4, 2, 23, 8
    q = torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, s, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, s, d, dtype=torch.float64, requires_grad=True)
    rows = [[7, 10, 6], [7, 10, 6]] if same_rows else [[7, 10, 6], [3, 20]]
    doc = DOC_IDS(_packed_positions(rows), None, None)
    window = None if left is None else [left, 0]
    out, lse = torch.ops.helix.attention(q, k, v, doc, causal=True, scale=0.3, window=window)
    ref, ref_lse = _dense_reference(q, k, v, doc, True, 0.3, left)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_one_document_per_row_is_the_plain_call():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    doc = torch.zeros(2, 16, dtype=torch.int32)
    a = torch.ops.helix.attention(q, k, v, doc, causal=True, scale=0.5)
    b = torch.ops.helix.attention(q, k, v, causal=True, scale=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_document_ids_are_rejected():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(HelixError, match=r"doc_ids of shape \(1, 7\): expected \[batch, seq\] = \[1, 8\]"):
        torch.ops.helix.attention(q, q, q, torch.zeros(1, 7, dtype=torch.int32), causal=True, scale=1.0)
    with pytest.raises(HelixError, match="must be int32 or int64"):
        torch.ops.helix.attention(q, q, q, torch.zeros(1, 8), causal=True, scale=1.0)


# ------------------------------------------------------------------------------ recognition
def _doc_nodes(program):
    return [n for n in program.captured.gm.graph.nodes if n.op == "call_function" and n.target == DOC_IDS]


@pytest.mark.parametrize("arch,inputs,role,impl", [
    ("llama", ("position_ids",), 0, "sdpa"), ("qwen2", ("position_ids",), 0, "sdpa"),
    ("llama", ("attention_mask",), 2, "sdpa"), ("llama", ("position_ids",), 0, "eager"),
    ("gpt2", ("attention_mask",), 2, "sdpa"),
])
def test_hugging_face_packed_and_padded_masks_become_document_ids(arch, inputs, role, impl):
    program = compile_program(hf_model(arch, num_layers=2, attn_implementation=impl), pp_size=2, seq_len=32,
                              inputs=inputs)
    (doc,) = _doc_nodes(program)
    assert [a.name if a is not None else None for a in doc.args][role] == inputs[0]
    for name in ("A1", "A2"):  # each attention segment reads the input and makes the ids itself
        code = program.segment(name).code
        assert "torch.ops.helix.document_ids.default" in code and inputs[0] in program.segment(name).user_inputs
    # the s x s mask subgraph is gone: no segment holds a [*, *, s, s] tensor
    for seg in program.segments:
        for n in seg.gm.graph.nodes:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 2:
                assert not (str(val.shape[-1]) == str(val.shape[-2]) and "s" in str(val.shape[-1])), n.format_node()


@pytest.mark.parametrize("make", [lambda: Llama(LlamaConfig(num_layers=2)),
                                  lambda: GPT(GPTConfig(num_layers=2, sdpa=False))], ids=["llama-sdpa", "gpt-explicit"])
def test_explicit_block_diagonal_mask_is_recognized_and_computes_the_model(make):
    torch.manual_seed(0)
    model = make().double()
    program = compile_program(model, pp_size=2, seq_len=24, inputs=("position_ids", "document_ids"))
    (doc,) = _doc_nodes(program)
    assert doc.args[1].name == "document_ids"
    rows = [[5, 12, 7], [10, 14]]
    pos = _packed_positions(rows)
    seg = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in rows])
    ids = torch.randint(0, 256, (2, 24))
    got = run_chain(program.segments, {"input_ids": ids, "labels": ids, "position_ids": pos, "document_ids": seg})
    want = model(ids, ids, position_ids=pos, document_ids=seg)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert abs(float(model(ids, ids, position_ids=pos).detach()) - float(want.detach())) > 1e-4  # the mask matters


class CrossDocument(Llama):
    """Sees every earlier document too: ``doc[k] <= doc[q]``, not a document mask."""

    def forward(self, input_ids, labels, document_ids=None):
        keep = document_mask(document_ids)
        keep = keep | (document_ids[:, None, None, :] < document_ids[:, None, :, None])
        t = input_ids.shape[1]
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), -1)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, emb.cos(), emb.sin(), keep & torch.ones(t, t, dtype=torch.bool).tril())
        return F.cross_entropy(self.lm_head(self.norm(x)).flatten(0, 1), labels.flatten())


def test_a_mask_that_crosses_documents_is_rejected():
    with pytest.raises(UnsupportedModelError, match="not a causal mask within documents"):
        compile_program(CrossDocument(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, inputs=("document_ids",))


def test_unknown_input_names_fail_before_tracing():
    with pytest.raises(HelixError, match="takes no 'doc'"):
        compile_program(Llama(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, inputs=("doc",))
    with pytest.raises(HelixError, match="leave out"):
        compile_program(Llama(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, inputs=("labels",))


# ------------------------------------------------------------------------------ batch checks
STAGE = SimpleNamespace(padding_inputs=("attention_mask",), document_inputs=("document_ids",), ignore_index=-100)


def test_batch_checks_accept_right_padding_and_packed_ids():
    labels = torch.tensor([[5, 6, -100, -100], [1, 2, 3, 4]])
    check_documents({"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), "labels": labels,
                     "document_ids": torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]])}, STAGE, 0)


@pytest.mark.parametrize("batch,match", [
    ({"attention_mask": torch.tensor([[0, 1, 1, 1]]), "labels": torch.full((1, 4), -100)}, "only right padding"),
    ({"attention_mask": torch.tensor([[1, 0, 1, 0]]), "labels": torch.full((1, 4), -100)}, "only right padding"),
    ({"attention_mask": torch.tensor([[1, 1, 0, 0]]), "labels": torch.tensor([[1, 2, 3, -100]])},
     r"labels\[0, 2\] = 3 on a padding token"),
    ({"attention_mask": torch.tensor([[1, 2, 0, 0]]), "labels": torch.full((1, 4), -100)}, "holds 2"),
    ({"document_ids": torch.tensor([[0, 0, 1, 0]])}, "reuses a document id"),
    ({"position_ids": torch.tensor([[0, 1, -1, 0]])}, "must be >= 0"),
])
def test_batch_checks_reject_what_would_change_the_model(batch, match):
    stage = SimpleNamespace(padding_inputs=("attention_mask",) if "attention_mask" in batch else (),
                            document_inputs=("document_ids",) if "document_ids" in batch else (),
                            ignore_index=-100)
    with pytest.raises(HelixError, match=match):
        check_documents(batch, stage, 0)


# ------------------------------------------------------------------------------ token loss
def test_token_loss_sums_and_counts_as_the_model_does():
    model = hf_model("llama", num_layers=2)
    program = compile_program(model, pp_size=2, seq_len=16)  # HF: "auto" is the token mean
    assert program.token_count is not None
    assert "sum_token_loss" in [r.name for r in program.passes]
    head = program.segments[-1].gm.code
    assert "cross_entropy_loss.default" in head and "2" in head.split("cross_entropy_loss.default")[1].split(")")[0]
    labels = torch.randint(0, 256, (1, 16))
    labels[0, [1, 5, 6]] = -100
    # Hugging Face shifts: token t predicts labels[t + 1]; the first label is never counted
    counted = int((labels[:, 1:] != -100).sum())
    assert int(program.token_count({"labels": labels, "input_ids": labels})) == counted
    plain = compile_program(Llama(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16)
    assert plain.token_count is None  # other models: the mean of micro-batch means unless asked
    tokens = compile_program(Llama(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, loss_reduction="tokens")
    assert int(tokens.token_count({"labels": labels})) == int((labels != -100).sum())


class ZLoss(Llama):
    def forward(self, input_ids, labels):
        return super().forward(input_ids, labels) + 1e-4 * self.lm_head.weight.square().sum()


def test_token_loss_rejects_a_loss_with_other_terms():
    with pytest.raises(UnsupportedModelError, match="loss_reduction='micro_batch_mean'"):
        compile_program(ZLoss(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, loss_reduction="tokens")
    with pytest.raises(HelixError, match="loss_reduction='sum' is not known"):
        compile_program(Llama(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, loss_reduction="sum")


class FarSighted(Llama):
    """Within documents up to 80 tokens back, but beyond that every earlier token: a rule that
    shows only on sequences longer than the mask's constant."""

    def forward(self, input_ids, labels, document_ids=None):
        t = input_ids.shape[1]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        keep = document_mask(document_ids) | ((i - j) >= 80)
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), -1)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, emb.cos(), emb.sin(), keep)
        return F.cross_entropy(self.lm_head(self.norm(x)).flatten(0, 1), labels.flatten())


def test_a_document_rule_that_changes_past_a_constant_is_probed_there_and_rejected():
    with pytest.raises(UnsupportedModelError, match="not a causal mask within documents"):
        compile_program(FarSighted(LlamaConfig(num_layers=2)), pp_size=2, seq_len=16, inputs=("document_ids",))
