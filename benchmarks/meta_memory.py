"""Per-rank memory of the big-model route: a meta-built model, ``helix_compile`` (each rank
materializes only what it owns) and ``load_pretrained`` from a safetensors checkpoint,
against the owned parameter bytes; side by side with the full-build route (every rank
builds and initializes the whole model, then compiles and loads the same checkpoint).

    python benchmarks/meta_memory.py                 # writes the BENCHMARKS.md section

One launch of ``pp`` ranks (1 thread each) per route. Resident memory is VmRSS from
/proc/self/status, after ``gc.collect()``, minus the rank's RSS before the model was built
(torch imported, process group up). The checkpoint is written once by the parent as a
Hugging Face style sharded safetensors checkpoint (``--shards`` files and
``model.safetensors.index.json``; memory-mapped: a rank reads only its tensors' pages). Load
time: ``load_pretrained`` of the rank's tensors against copying out every tensor of the
checkpoint.

Default sizes (what BENCHMARKS.md records): pp=8, 16 layers, hidden 1024, ffn 2752, vocab
32000 with an untied head (the default head placement puts it off rank 0): the full model is
about 958 MiB, >= 10x the share of every rank but the two that hold the embedding or the head.

"Within 10% plus a fixed runtime overhead": each rank's RSS after compile + load is compared
with ``1.1 x owned + fixed``, where ``fixed`` is measured, not fitted: the same rank's RSS
after compile + load in a third launch of the same architecture (same layers, heads, head
stage, pp) at tiny widths (hidden 64, ffn 172, vocab 256: it owns well under 1 MiB), i.e.
the compiler's and runtime's own memory (graphs, schedule, transport), whatever the sizes.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helix_compiler.reporting import cpu_model, write_section  # noqa: E402

MiB = 2**20


def rss() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


PROBE = dict(hidden=64, ffn=172, vocab=256)  # the fixed-overhead probe: same architecture, tiny widths


def _config(cfg: dict):
    from helix_compiler.models import LlamaConfig

    return LlamaConfig(vocab_size=cfg["vocab"], num_layers=cfg["layers"], hidden=cfg["hidden"], heads=8,
                       kv_heads=4, ffn=cfg["ffn"])


def _worker(rank: int, cfg: dict) -> dict:
    from safetensors import safe_open

    from helix_compiler import helix_compile, load_pretrained
    from helix_compiler.load import checkpoint_files
    from helix_compiler.models import Llama

    before = rss()
    t0 = time.perf_counter()
    with torch.device("meta" if cfg["route"] == "meta" else "cpu"):
        model = Llama(_config(cfg))
    built = rss()
    pipe = helix_compile(model, cfg["pp"], cfg["seq"], num_microbatches=2 * cfg["pp"], timeout=300,
                         head_stage=cfg.get("head_stage"))  # None: the default placement
    compiled = rss()
    t1 = time.perf_counter()
    load_pretrained(pipe, cfg["path"])
    load_s = time.perf_counter() - t1
    total_s = time.perf_counter() - t0
    loaded = rss()
    t2 = time.perf_counter()
    full = 0
    for file in sorted(set(checkpoint_files(cfg["path"]).values())):  # every tensor, copied out
        with safe_open(file, framework="pt") as f:
            full += sum(f.get_tensor(k).clone().numel() for k in f.keys())  # noqa: SIM118
    full_read_s = time.perf_counter() - t2
    ids = torch.randint(0, cfg["vocab"], (2 * cfg["pp"], cfg["seq"]))
    pipe(ids, ids).backward()  # it runs: the loaded weights are the model
    owned = sum(p.numel() * p.element_size() for p in pipe.parameters())
    allocated = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    return {"rank": rank, "owned": owned, "allocated": allocated, "built": built - before,
            "compiled": compiled - before, "loaded": loaded - before, "load_s": load_s, "total_s": total_s,
            "full_read_s": full_read_s, "full_numel": full, "head_stage": pipe.schedule.head_stage,
            "head_reason": pipe.program.head_stage_reason}


def _save_sharded(state: dict, path: str, shards: int) -> None:
    """A Hugging Face style sharded checkpoint: ``shards`` files and model.safetensors.index.json."""
    import json

    from safetensors.torch import save_file

    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        if part:
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n].contiguous() for n in part}, os.path.join(path, file))
            weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def main() -> None:
    from helix_compiler.models import Llama
    from helix_compiler.runtime.launch import spawn_ranks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2752)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--shards", type=int, default=8, help="safetensors files of the checkpoint (with an index)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(pp=args.pp, layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab,
                   seq=args.seq, path=tmp)
        torch.manual_seed(0)
        model = Llama(_config(cfg))
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        _save_sharded(model.state_dict(), tmp, args.shards)
        del model
        runs = {route: spawn_ranks(_worker, args.pp, {**cfg, "route": route}, timeout=1800)
                for route in ("meta", "full")}
    head = runs["meta"][0]["head_stage"]
    with tempfile.TemporaryDirectory() as tmp:  # the fixed-overhead probe, with the same head stage
        probe_cfg = {**cfg, **PROBE, "path": tmp, "route": "meta", "head_stage": head}
        torch.manual_seed(0)
        _save_sharded(Llama(_config(probe_cfg)).state_dict(), tmp, args.shards)
        probe = {r["rank"]: r for r in spawn_ranks(_worker, args.pp, probe_cfg, timeout=1800)}
    wall = time.perf_counter() - t_start
    by_rank = {route: {r["rank"]: r for r in results} for route, results in runs.items()}
    ranks = sorted(by_rank["meta"])
    fixed = {k: probe[k]["loaded"] for k in ranks}  # RSS after compile + load of a rank owning ~nothing
    bound = {k: 1.1 * by_rank["meta"][k]["owned"] + fixed[k] for k in ranks}
    ok = {route: {k: by_rank[route][k]["loaded"] <= bound[k] for k in ranks} for route in runs}
    small = [k for k in ranks if full_bytes >= 10 * by_rank["meta"][k]["owned"]]
    lines = [f"Llama, {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, 8 heads / 4 KV heads, vocab "
             f"{args.vocab} (untied head): {full_bytes / MiB:.1f} MiB of float32 parameters; pp={args.pp}, helix "
             f"schedule, seq_len {args.seq}, default head placement: head on rank {head} "
             f"({runs['meta'][0]['head_reason']}); checkpoint: {args.shards} safetensors shards with an index (in the "
             f"page cache). RSS deltas per rank over the rank before building the model. Load s (own): "
             f"load_pretrained of the rank's tensors; read all s: every tensor of the checkpoint copied out.",
             "",
             f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; torch {torch.__version__}; Python "
             f"{platform.python_version()}; {args.pp} ranks x 1 thread, gloo; three launches (meta, full, probe) "
             f"in {wall:.0f} s.",
             f"Command: `python benchmarks/meta_memory.py --pp {args.pp} --layers {args.layers} --hidden "
             f"{args.hidden} --ffn {args.ffn} --vocab {args.vocab} --seq {args.seq} --shards {args.shards}`",
             "",
             "Per rank, the two routes side by side (MiB). Fixed overhead: that rank's RSS after compile + load in "
             f"the probe launch (the same architecture, pp and head stage at hidden {PROBE['hidden']}, ffn "
             f"{PROBE['ffn']}, vocab {PROBE['vocab']}; it owns the 'probe owned' MiB). Bound = 1.1 x owned + fixed; "
             "'within' = RSS after compile + load <= bound.",
             "",
             "| rank | owned | full model / owned | probe owned | fixed overhead | bound | meta: after compile | "
             "meta: after load | meta within | full: after compile | full: after load | full within |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for k in ranks:
        m, f = by_rank["meta"][k], by_rank["full"][k]
        lines.append(f"| {k} | {m['owned'] / MiB:.1f} | {full_bytes / m['owned']:.1f}x | {probe[k]['owned'] / MiB:.2f} | "
                     f"{fixed[k] / MiB:.1f} | {bound[k] / MiB:.1f} | {m['compiled'] / MiB:.1f} | "
                     f"{m['loaded'] / MiB:.1f} | {yes[ok['meta'][k]]} | {f['compiled'] / MiB:.1f} | "
                     f"{f['loaded'] / MiB:.1f} | {yes[ok['full'][k]]} |")
    lines += ["",
              "Details per route:",
              "",
              "| route | rank | owned MiB | allocated model MiB | RSS after build | after helix_compile | "
              "after load | load s (own) | read all s | overhead MiB (RSS - owned) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for route, results in runs.items():
        for r in sorted(results, key=lambda r: r["rank"]):
            lines.append(f"| {route} | {r['rank']} | {r['owned'] / MiB:.1f} | {r['allocated'] / MiB:.1f} | "
                         f"{r['built'] / MiB:.1f} | {r['compiled'] / MiB:.1f} | {r['loaded'] / MiB:.1f} | "
                         f"{r['load_s']:.3f} | {r['full_read_s']:.3f} | {(r['loaded'] - r['owned']) / MiB:.1f} |")
    meta = runs["meta"]
    over = [(r["loaded"] - r["owned"]) / MiB for r in meta]
    fx = [v / MiB for v in fixed.values()]
    excess = [(by_rank["meta"][k]["loaded"] - by_rank["meta"][k]["owned"] - fixed[k])
              / by_rank["meta"][k]["owned"] for k in ranks]
    lines += ["", f"Ranks whose share is <= 1/10 of the model (full model >= 10x owned): "
                  f"{', '.join(map(str, small)) or 'none'} ({len(small)} of {len(ranks)}). Meta route: within 10% "
                  f"plus the fixed overhead on {sum(ok['meta'].values())} of {len(ranks)} ranks "
                  f"({'every rank' if all(ok['meta'].values()) else 'not every rank'}); RSS - owned is "
                  f"{min(over):.1f}-{max(over):.1f} MiB against a measured fixed overhead of {min(fx):.1f}-"
                  f"{max(fx):.1f} MiB (RSS - owned - fixed: {min(excess) * 100:+.1f}% to {max(excess) * 100:+.1f}% of "
                  f"owned). Full-build route: within on {sum(ok['full'].values())} of {len(ranks)} ranks: every rank "
                  f"holds the whole model ({full_bytes / MiB:.1f} MiB) until the user drops it. 'allocated model MiB': "
                  f"bytes of the model's tensors that are not meta on that rank (owned ones only on the meta route)."]
    text = "## Big-model life cycle: per-rank memory of a meta-built model vs the full build (CPU)\n\n" + \
        "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "meta_memory", text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
