"""Main job: pipelined training of a small Llama-style model at a long sequence on CPU.

    torchrun --nproc-per-node 2 examples/train_long_context.py --out out
    torchrun --nproc-per-node 4 examples/train_long_context.py --out out --dp 2   # pp=2 x dp=2
    torchrun --nproc-per-node 4 examples/train_long_context.py --out out --tp 2   # pp=2 x tp=2
    torchrun --nproc-per-node 2 examples/train_long_context.py --out out --steps 6 --save-every 3
    torchrun --nproc-per-node 2 examples/train_long_context.py --out out --steps 6 --resume out/checkpoints/step3

Each rank compiles the same unmodified model with helix_compile, trains a few steps under
the HelixPipe two-fold FILO schedule over gloo, and rank 0 checks the step-1 loss against a
single-process run of the same model on the same batch. By default every sequence packs
documents of random lengths (a synthetic stream: each document counts up from a random
token): ``position_ids`` restart per document, ``document_ids`` mask attention at document
boundaries, the last token of each document predicts nothing (label -100), and the loss is
the mean over the step's counted tokens. ``--no-pack``: one document per sequence. Written to --out: every rank's stage
graphs (readable Python), the schedule (text + picture), and a timeline of the real run
(measured per-instruction times, one row per rank).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

from helix_compiler import helix_compile
from helix_compiler.checkpoint import load_checkpoint, save_checkpoint
from helix_compiler.models import Llama, LlamaConfig
from helix_compiler.runtime.launch import init_from_env
from helix_compiler.sim.measured import measured_result, trace_from_json, trace_to_json
from helix_compiler.sim.trace import write_chrome_trace


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=None, help="default: pp_size * folds")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--recompute", default="without_attention")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--docs", type=int, default=4, help="packed documents per sequence (random lengths)")
    ap.add_argument("--no-pack", action="store_true", help="one document per sequence (no document masking)")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas (world = pp x dp x tp)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage (world = pp x dp x tp)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="save a DCP checkpoint (model, optimizer, step, every rank's RNG) every N steps to "
                         "OUT/checkpoints/stepN")
    ap.add_argument("--resume", default=None, help="resume from this checkpoint directory (any pipeline size)")
    return ap.parse_args()


def synthetic_batch(rows: int, seq: int, vocab: int, docs: int, gen: torch.Generator):
    """``(input_ids, labels, extra inputs)``: per row, documents of random lengths (``docs``
    of them), each counting up from a random token; a token's label is the next token
    of its document, -100 on a document's last token."""
    ids = torch.empty(rows, seq, dtype=torch.long)
    labels = torch.empty(rows, seq, dtype=torch.long)
    pos = torch.empty(rows, seq, dtype=torch.long)
    doc = torch.empty(rows, seq, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randperm(seq - 1, generator=gen)[:docs - 1].add(1).tolist())
        for d, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq], strict=True)):
            start = int(torch.randint(0, vocab, (), generator=gen))
            ids[r, a:b] = (start + torch.arange(b - a)) % vocab
            labels[r, a:b] = (ids[r, a:b] + 1) % vocab
            labels[r, b - 1] = -100
            pos[r, a:b] = torch.arange(b - a)
            doc[r, a:b] = d
    return ids, labels, ({"position_ids": pos, "document_ids": doc} if docs > 1 else {})


def main() -> None:
    args = parse_args()
    info = init_from_env(num_threads=1)
    rank, world = info.rank, info.world_size
    if world % (args.dp * args.tp):
        raise SystemExit(f"--dp {args.dp} x --tp {args.tp} must divide the {world} processes (world = pp x dp x tp)")
    pp = world // (args.dp * args.tp)
    mesh = None
    if args.dp > 1 or args.tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (args.dp, pp, args.tp), mesh_dim_names=("dp", "pp", "tp"))
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    out = Path(args.out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, num_layers=args.layers, hidden=args.hidden, heads=args.heads,
                      kv_heads=args.kv_heads, ffn=(8 * args.hidden // 3 + 7) // 8 * 8)  # Llama: 8h/3, rounded up
    model = Llama(cfg)
    reference = copy.deepcopy(model) if rank == 0 else None
    M = args.microbatches or pp * args.folds
    packed = not args.no_pack
    doc_len = args.seq_len // args.docs
    typical = (doc_len,) * (args.docs - 1) + (args.seq_len - doc_len * (args.docs - 1),)
    pipe = helix_compile(model, pp, args.seq_len, num_microbatches=M, num_folds=args.folds, mesh=mesh,
                         recompute=args.recompute, record_trace=True,
                         inputs=("position_ids", "document_ids") if packed else (),
                         loss_reduction="tokens", document_lengths=typical if packed else None)
    opt = torch.optim.AdamW(list(pipe.parameters()), lr=args.lr)
    start = load_checkpoint(args.resume, pipe, opt) if args.resume else 0

    (out / "stage_graphs").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "schedule.txt").write_text(str(pipe.schedule))
        (out / "program.txt").write_text(str(pipe.program))
        print(pipe.program)
    pipe.transport.barrier()
    for name, gm in pipe.stage_graphs().items():
        (out / "stage_graphs" / f"rank{rank}_{name}.py").write_text(gm.code)

    gen = torch.Generator().manual_seed(1234)
    for _ in range(start):  # the data position: the batches the checkpointed steps consumed
        synthetic_batch(M * args.dp, args.seq_len, args.vocab, args.docs if packed else 1, gen)
    steps = range(start, args.steps)
    traces = None
    if rank == 0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"helix pp={pp} dp={args.dp} tp={args.tp} s={args.seq_len}", unit="step")
    losses = []
    for step in steps:
        # the union batch of every replica; each takes its own M rows
        ids, labels, extra = synthetic_batch(M * args.dp, args.seq_len, args.vocab, args.docs if packed else 1, gen)
        mine = slice(dp_rank * M, (dp_rank + 1) * M)
        loss = pipe(ids[mine], labels[mine], **{k: v[mine] for k, v in extra.items()})
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().item())
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(out / "checkpoints" / f"step{step + 1}", pipe, opt, step=step + 1)
        if rank == 0:
            steps.set_postfix(loss=f"{losses[-1]:.4f}")
        if step == 0:
            traces = pipe.transport.gather_objects(trace_to_json(pipe.executor.trace))
            if rank == 0:
                with torch.no_grad():  # the whole batch at once: its loss is the token mean
                    single = reference(ids, labels, **extra)
                diff = abs(float(single) - losses[0])
                print(f"step 1 loss: pipelined {losses[0]:.6f}  single process {float(single):.6f}  "
                      f"|diff| {diff:.2e}")
                if diff > 1e-4 * max(1.0, abs(float(single))):
                    raise SystemExit(f"loss parity FAILED: |diff|={diff:.3e}")
    pipe.transport.barrier()
    if rank == 0 and traces is not None:
        measured = measured_result(pipe.schedule, [trace_from_json(t) for t in traces])
        measured.write_timeline(out / "timeline_measured.png",
                                title=f"HelixPipe measured step 1: p={pp}, dp={args.dp}, tp={args.tp}, M={M}, F={args.folds}, s={args.seq_len}")
        write_chrome_trace(measured, out / "trace_measured.json")
        pic = pipe.schedule.picture() if hasattr(pipe.schedule, "picture") else ""
        (out / "schedule_picture.txt").write_text(str(pic))
        data = f"{args.docs} packed documents of random lengths per sequence" if packed else "one document per sequence"
        print(f"data: {data}")
        print(f"losses: {[round(x, 4) for x in losses]}")
        print(f"wrote {out}/: program.txt, schedule.txt, schedule_picture.txt, stage_graphs/, timeline_measured.png, trace_measured.json")
    elif rank == 0:
        print(f"resumed after step {start}: losses of steps {start + 1}..{args.steps}: {losses}")
    pipe.transport.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
