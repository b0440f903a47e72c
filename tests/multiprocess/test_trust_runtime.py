"""Trust at run time (issue 8): dropout under recomputation gives the gradient of the returned
loss; train/eval switch dropout; evaluation under no_grad; every bad input raises on every rank
before any message; ranks agree on the batch, the program and tied weights; a failed step
leaves a pipeline that says it is broken."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = [pytest.mark.multiprocess]

SEQ, M, VOCAB = 16, 4, 64


class _Block(nn.Module):
    def __init__(self, h: int, heads: int, p: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.drop = nn.Dropout(p)
        self.heads = heads

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class DropoutGPT(nn.Module):
    """GPT-2-like, float64 end to end, dropout on the embedding and both residual branches
    (attention itself without dropout, as helix requires)."""

    def __init__(self, p: float = 0.1, layers: int = 4, h: int = 32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, h), nn.Embedding(SEQ, h)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(_Block(h, 4, p) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(h), nn.Linear(h, VOCAB, bias=False)

    def forward(self, input_ids, labels):
        x = self.drop(self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device)))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.lnf(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _model(p: float = 0.1) -> DropoutGPT:
    torch.manual_seed(0)
    return DropoutGPT(p).double()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (M, SEQ), generator=g), torch.randint(0, VOCAB, (M, SEQ), generator=g)


def _compile(model, **kw):
    from helix_compiler import helix_compile

    kw.setdefault("num_microbatches", M)
    kw.setdefault("timeout", 20)
    return helix_compile(model, 2, SEQ, **kw)


def _step(pipe, ids, labels, seed=1234):
    torch.manual_seed(seed)
    loss = pipe(ids, labels)
    loss.backward()
    return float(loss.detach())


def _direction(name: str, p: torch.Tensor) -> torch.Tensor:
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())), dtype=p.dtype)


def _finite_difference(rank: int, policy: str) -> tuple[float, float, float]:
    """(directional derivative from the pipeline's gradient, central finite difference of the
    returned loss, the loss) along one random direction, with the same dropout masks."""
    import torch.distributed as dist

    pipe = _compile(_model(), recompute=policy)
    ids, labels = _batch()
    loss = _step(pipe, ids, labels)
    params = dict(pipe.named_parameters())
    firsts = {n: min(pipe.stage.shared[n].holders) for n in pipe.stage.shared}
    dot = torch.zeros((), dtype=torch.float64)
    for n, p in params.items():
        if firsts.get(n, rank) == rank:  # a tied weight's gradient counts once
            dot += (p.grad * _direction(n, p)).sum()
    dist.all_reduce(dot)
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * _direction(n, p))
        values.append(_step(pipe, ids, labels))
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * eps * _direction(n, p))
    return float(dot), (values[0] - values[1]) / (2 * eps), loss


def _fd_worker(rank: int) -> dict:
    return {policy: _finite_difference(rank, policy) for policy in ("none", "without_attention", "full")}


def test_dropout_under_every_recompute_policy_gives_the_gradient_of_the_returned_loss():
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_fd_worker, 2, timeout=240)
    for policy, (analytic, numeric, loss) in results[0].items():
        assert analytic == pytest.approx(numeric, rel=1e-6), (policy, analytic, numeric)
        assert results[1][policy] == (analytic, numeric, loss)
    # dropout is on: the loss depends on the masks, the same under every policy (same seed)
    losses = {policy: r[2] for policy, r in results[0].items()}
    assert len(set(losses.values())) == 1, losses


def _eval_worker(rank: int) -> dict:
    from helix_compiler.capture.adapters import adapt_model

    model = _model()
    ref = adapt_model(copy.deepcopy(model).eval())
    pipe = _compile(model)
    ids, labels = _batch()
    with torch.no_grad():
        want = float(torch.stack([ref(i[None], t[None]) for i, t in zip(ids, labels, strict=True)]).mean())
    pipe.eval()
    with torch.no_grad():
        evals = [float(pipe(ids, labels)) for _ in range(3)]  # any number of times, nothing pending
    pending = pipe.executor.live_bytes()
    trained_eval = _step(pipe, ids, labels)  # eval mode with autograd: a full step without dropout
    pipe.train()
    with torch.no_grad():
        train_nograd = float(pipe(ids, labels))
    trained = _step(pipe, ids, labels)
    return dict(want=want, evals=evals, pending=pending, trained_eval=trained_eval, train_nograd=train_nograd,
                trained=trained)


def test_eval_switches_dropout_off_and_no_grad_evaluation_keeps_nothing_pending():
    from helix_compiler.runtime.launch import spawn_ranks

    for r in spawn_ranks(_eval_worker, 2, timeout=180):
        for v in r["evals"] + [r["trained_eval"]]:
            assert v == pytest.approx(r["want"], rel=1e-12)
        assert r["pending"] == 0
        assert r["train_nograd"] != pytest.approx(r["want"], rel=1e-6)  # dropout back on
        assert r["trained"] != pytest.approx(r["want"], rel=1e-6)


def _bad_inputs_worker(rank: int) -> dict:
    from helix_compiler.capture.adapters import adapt_model

    model = _model(p=0.0)
    ref = adapt_model(copy.deepcopy(model))
    pipe = _compile(model)
    ids, labels = _batch()
    errors = {}
    cases = {
        "float_ids": (ids.double(), labels),
        "labels_none": (ids, None),
        "id_range": (ids + VOCAB, labels),
        "negative_id": (ids - VOCAB, labels),
        "label_range": (ids, labels + VOCAB),
        "shape": (ids[:, :-1], labels[:, :-1]),
        "other_rank_differs": (ids, labels if rank == 0 else labels.roll(1)),
    }
    for what, (i, t) in cases.items():
        try:
            _step(pipe, i, t)
            errors[what] = None
        except Exception as e:  # noqa: BLE001 - every rank must raise the same error
            errors[what] = f"{type(e).__name__}: {e}"
    sent_before = pipe.transport.stats.sent_messages
    ignored = labels.clone()
    ignored[:, :3] = -100
    loss = _step(pipe, ids, ignored)  # ignore_index is a valid label; and no rank drifted a step
    want = float(torch.stack([ref(i[None], t[None]) for i, t in zip(ids, ignored, strict=True)]).mean())
    return dict(errors=errors, loss=loss, want=want, sent_before=sent_before,
                sent=pipe.transport.stats.sent_messages)


def test_bad_inputs_raise_on_every_rank_before_any_message_and_ranks_do_not_drift():
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_bad_inputs_worker, 2, timeout=180)
    expect = {"float_ids": "dtype torch.float64", "labels_none": "labels is missing",
              "id_range": "token ids must lie in [0, 64)", "negative_id": "token ids must lie in [0, 64)",
              "label_range": "ignore_index -100", "shape": "compiled for (4, 16)",
              "other_rank_differs": "disagree on the batch"}
    for r in results:
        for what, text in expect.items():
            assert r["errors"][what] is not None and "HelixError" in r["errors"][what], (what, r["errors"][what])
            assert text in r["errors"][what], (what, r["errors"][what])
        assert r["loss"] == pytest.approx(r["want"], rel=1e-12)
    # only the one good step sent messages: every rejected input was caught before any message
    assert all(r["sent_before"] == 0 and r["sent"] > 0 for r in results)


def _mismatch_worker(rank: int, what: str) -> str:
    from helix_compiler.models import GPT, GPTConfig

    try:
        if what == "num_microbatches":
            _compile(_model(p=0.0), num_microbatches=M if rank == 0 else 2 * M)
        elif what == "tied":
            torch.manual_seed(0)
            model = GPT(GPTConfig(num_layers=2, vocab_size=VOCAB, max_seq_len=SEQ)).double()
            if rank == 1:
                with torch.no_grad():
                    model.wte.weight[0, 0] += 1.0  # tied: embedding and head
            _compile(model, head_stage=1)
        elif what == "zb1p":
            _compile(_model(p=0.0), schedule="zb1p")
        return "no error"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("what,text", [("num_microbatches", "disagree on the compiled program"),
                                       ("tied", "disagree on the initial value of"),
                                       ("zb1p", "simulator")])
def test_helix_compile_rejects_ranks_that_compiled_differently(what, text):
    from helix_compiler.runtime.launch import spawn_ranks

    for r in spawn_ranks(_mismatch_worker, 2, what, timeout=180):
        assert "HelixError" in r and text in r, r


def _broken_worker(rank: int) -> list[str]:
    pipe = _compile(_model(p=0.0), timeout=3)
    if rank == 1:
        forward, calls = pipe.executor.dispatch["F"], []

        def failing(instr):
            calls.append(instr)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            forward(instr)

        pipe.executor.dispatch["F"] = failing
    seen = []
    for _ in range(2):
        try:
            _step(pipe, *_batch())
            seen.append("ok")
        except Exception as e:  # noqa: BLE001
            seen.append(f"{type(e).__name__}: {e}")
    return seen


def test_a_failed_step_leaves_a_pipeline_that_says_it_is_broken():
    from helix_compiler.runtime.launch import spawn_ranks

    for r in spawn_ranks(_broken_worker, 2, timeout=120, return_exceptions=True):
        assert not isinstance(r, Exception), r
        first, second = r
        assert first.startswith("RuntimeFailure"), first
        assert second.startswith("HelixError") and "pipeline is broken" in second and "rebuild" in second, second
