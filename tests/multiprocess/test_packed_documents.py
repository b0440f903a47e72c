"""Packed documents, padding and token-weighted loss: the pipelined step equals the user's
single-process model on the same batch (loss and every gradient, float64), over gloo on CPU.

Packed batches hold 3 documents of different lengths per sequence (different boundaries per
row); Hugging Face models see them through ``position_ids`` that restart per document (their
packed-sequence path), the built-in models through ``position_ids`` plus ``document_ids`` (an
explicit block-diagonal causal mask). Labels carry -100 at uneven places, so micro batches
count different numbers of tokens."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.multiprocess]

SEQ = 32
RTOL, ATOL = 1e-9, 1e-12


def _model(arch: str):
    from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, hf_model

    torch.manual_seed(0)
    if arch == "gpt":
        m = GPT(GPTConfig(num_layers=4, max_seq_len=64, sdpa=False))
    elif arch == "llama":
        m = Llama(LlamaConfig(num_layers=4))
    else:
        m = hf_model(arch.removeprefix("hf_"), num_layers=4)
    return m.to(torch.float64)


def packed_batch(rows: int, seq: int, seed: int, *, docs: int = 3, pad: bool = False):
    """``(input_ids, labels, position_ids, document_ids, attention_mask)``: ``docs`` documents
    of random lengths per row (or, with ``pad``, one document and right padding), labels -100
    on a random number of tokens per row and on every padding token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, seq), generator=g)
    labels = ids.clone()
    pos = torch.zeros(rows, seq, dtype=torch.long)
    doc = torch.zeros(rows, seq, dtype=torch.long)
    mask = torch.ones(rows, seq, dtype=torch.long)
    for r in range(rows):
        if pad:
            real = int(torch.randint(seq // 2, seq, (), generator=g))
            mask[r, real:] = 0
            labels[r, real:] = -100
            pos[r] = torch.arange(seq)
            continue
        cuts = sorted(torch.randperm(seq - 2, generator=g)[:docs - 1].add(1).tolist())
        bounds = [0, *cuts, seq]
        for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            pos[r, a:b] = torch.arange(b - a)
            doc[r, a:b] = d
        ignored = int(torch.randint(0, seq // 2, (), generator=g))
        labels[r, torch.randperm(seq, generator=g)[:ignored]] = -100
    return ids, labels, pos, doc, mask


def _worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import helix_compile
    from helix_compiler.capture.adapters import adapt_model

    model = _model(cfg["arch"])
    ref = copy.deepcopy(model)
    M, inputs = cfg["M"], cfg["inputs"]
    ids, labels, pos, doc, mask = packed_batch(M, SEQ, seed=cfg.get("seed", 1), pad=cfg.get("pad", False))
    extra = {"position_ids": pos, "document_ids": doc, "attention_mask": mask}
    extra = {k: v for k, v in extra.items() if k in inputs}
    if cfg.get("torch_compile"):  # called the Hugging Face way, by keyword
        import helix_compiler  # noqa: F401  (registers the backend)

        compiled = torch.compile(model, backend="helix", dynamic=True, options=dict(num_microbatches=M, timeout=60))
        out = compiled(input_ids=ids, labels=labels, **extra)
        assert out.logits.device.type == "meta" and out.logits.shape == (M, SEQ, 256)  # never gathered
        loss = out.loss
        pipe = None
    else:
        pipe = helix_compile(model, cfg["p"], SEQ, num_microbatches=M, inputs=inputs, timeout=60,
                             **cfg.get("options", {}))
        loss = pipe(ids, labels, **extra)
    loss.backward()
    hf = cfg["arch"].startswith("hf_")
    if cfg["reference"] == "full_batch":  # the model's own token mean over the whole batch
        ref_loss = ref(input_ids=ids, labels=labels, **extra).loss if hf else ref(ids, labels, **extra)
    else:  # mean of per-micro-batch losses
        fn = adapt_model(ref, inputs=tuple(extra))
        ref_loss = torch.stack([fn(ids[m:m + 1], labels[m:m + 1], *(v[m:m + 1] for v in extra.values()))
                                for m in range(M)]).mean()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    # through torch.compile this rank's parameters are those that got a gradient
    mine = list(pipe.named_parameters()) if pipe is not None else [
        (n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert mine, f"rank {rank}: no parameter got a gradient"
    for name, p in mine:
        r = ref_params[name]
        assert p.grad is not None, f"rank {rank}: no gradient for {name}"
        if not torch.allclose(p.grad, r.grad, rtol=RTOL, atol=ATOL):
            raise AssertionError(f"rank {rank}: gradient of {name} differs by {float((p.grad - r.grad).abs().max()):.3e}")
    if "position_ids" in extra:  # the masking matters: the batch read as one document per row differs
        plain = copy.deepcopy(ref)
        with torch.no_grad():
            unmasked = plain(input_ids=ids, labels=labels).loss if hf else plain(ids, labels)
        assert abs(float(unmasked) - float(loss.detach())) > 1e-4, "document masking changed nothing"
    return {"loss": float(loss.detach()), "ref": float(ref_loss.detach()),
            "owned": sorted(n for n, _ in mine), "all": sorted(ref_params)}


CASES = [
    # (arch, pp ranks, inputs, reference, extra cfg)
    ("hf_llama", 2, ("position_ids",), "full_batch", {}),  # HF Llama packed via position_ids
    ("hf_llama", 4, ("position_ids",), "full_batch", {}),
    ("hf_qwen2", 2, ("position_ids",), "full_batch", {}),
    ("hf_qwen2", 4, ("position_ids",), "full_batch", {}),
    ("hf_llama", 2, ("attention_mask",), "full_batch", {"pad": True}),  # HF right padding
    ("hf_llama", 2, (), "full_batch", {}),  # token-weighted loss with uneven -100 counts
    ("hf_llama", 2, (), "micro_batch_mean", {"options": {"loss_reduction": "micro_batch_mean"}}),
    ("llama", 2, ("position_ids", "document_ids"), "micro_batch_mean", {}),
    ("llama", 4, ("position_ids", "document_ids"), "full_batch", {"options": {"loss_reduction": "tokens"}}),
    ("gpt", 2, ("position_ids", "document_ids"), "micro_batch_mean", {}),
    ("gpt", 4, ("position_ids", "document_ids"), "full_batch", {"options": {"loss_reduction": "tokens"}}),
    ("hf_llama", 2, ("position_ids",), "full_batch", {"torch_compile": True}),
]


@pytest.mark.parametrize("arch,p,inputs,reference,extra", CASES,
                         ids=[f"{c[0]}-p{c[1]}-{'+'.join(c[2]) or 'plain'}-{c[3]}{'-torch_compile' * bool(c[4].get('torch_compile'))}"
                              for c in CASES])
def test_packed_parity(arch, p, inputs, reference, extra):
    from helix_compiler.runtime.launch import spawn_ranks

    cfg = dict(arch=arch, p=p, M=2 * p, inputs=inputs, reference=reference, **extra)
    results = spawn_ranks(_worker, p, cfg, timeout=300)
    # Hugging Face models upcast the logits to float32 for the loss: the loss (not the
    # gradients, which reach float64 weights) is then float32, summed in another order
    rel = 1e-6 if arch.startswith("hf_") else RTOL
    for r in results:
        assert r["loss"] == pytest.approx(r["ref"], rel=rel, abs=ATOL)
    assert set().union(*(r["owned"] for r in results)) == set(results[0]["all"])
    assert len({r["loss"] for r in results}) == 1
