"""``helix``: compile a model offline and look at the result, or search its schedules.

    helix show --model llama --layers 8 --hidden 1024 --seq-len 32768 --pp-size 4
    helix simulate --model gpt --layers 32 --hidden 4096 --heads 32 --seq-len 131072 --pp-size 8 \\
        --device H20 --timeline helix.png --trace helix.json
    helix tune --model llama --layers 32 --hidden 4096 --heads 32 --seq-len 131072 --pp-size 8 --tp 8 \\
        --device H20 --tokens-per-step 2097152
    helix tune --hf qwen2 --set num_hidden_layers=28 --seq-len 32768 --pp-size 4 --device H200

Models (built-in shapes, ``--hf-config config.json``, ``--hf TYPE --set KEY=VALUE``, ``--module
pkg.mod:function``) are built on the meta device, so any size compiles without allocating weights.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import cli_tune
from .config import SCHEDULES
from .cost.devices import PRESETS, get_device
from .errors import HelixError
from .ir.segment import POLICIES


def _model(args) -> torch.nn.Module:
    from .models import GPT, GPTConfig, Llama, LlamaConfig

    dtype = cli_tune.DTYPES[args.dtype or ("bf16" if args.command == "tune" else "fp32")]
    if cli_tune.has_model_source(args):
        return cli_tune.build_model(args, dtype)
    with torch.device("meta"):
        if args.model == "gpt":
            return GPT(GPTConfig(vocab_size=args.vocab, max_seq_len=args.seq_len, num_layers=args.layers,
                                 hidden=args.hidden, heads=args.heads)).to(dtype)
        return Llama(LlamaConfig(vocab_size=args.vocab, num_layers=args.layers, hidden=args.hidden, heads=args.heads,
                                 kv_heads=args.kv_heads or args.heads,
                                 ffn=args.ffn or int(8 * args.hidden / 3))).to(dtype)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="helix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("show", "print the segments, cuts and per-rank schedule"),
                       ("simulate", "simulate one iteration on a device preset"),
                       ("tune", "search schedules by simulation: the fastest that fits, a ranked table, a picture")):
        p = sub.add_parser(name, help=text)
        cli_tune.add_model_source_args(p)
        p.add_argument("--dtype", choices=tuple(cli_tune.DTYPES), default=None,
                       help="parameter / activation dtype of the model (default: fp32; tune: bf16)")
        p.add_argument("--model", choices=("gpt", "llama"), default="llama")
        p.add_argument("--layers", type=int, default=8)
        p.add_argument("--hidden", type=int, default=1024)
        p.add_argument("--heads", type=int, default=8)
        p.add_argument("--kv-heads", type=int, default=None)
        p.add_argument("--ffn", type=int, default=None)
        p.add_argument("--vocab", type=int, default=32000)
        p.add_argument("--seq-len", type=int, default=32768)
        p.add_argument("--pp-size", type=int, default=4)
        if name == "tune":
            cli_tune.add_tune_args(p)
        else:
            p.add_argument("--microbatches", type=int, default=None)
            p.add_argument("--folds", type=int, default=2)
            p.add_argument("--recompute", choices=POLICIES, default="without_attention")
            p.add_argument("--schedule", choices=SCHEDULES, default="helix")
            p.add_argument("--head-stage", type=cli_tune.head_stage, default=None,
                           help="helix: the loss head's stage, or auto (the least loaded); default: auto "
                                "when the untied head has >= half a mean layer's parameters, else 0")
            p.add_argument("--virtual-stages", type=int, default=None, help="interleaved: model chunks per rank")
            p.add_argument("--mlp-chunks", type=int, default=None, help="chunk the MLPs along the sequence")
        p.add_argument("--documents", type=_lengths, default=None, metavar="L1,L2,...",
                       help="lengths of the documents packed into one sequence (summing to --seq-len): "
                            "attention is costed per document")
        if name == "show":
            p.add_argument("--tp", type=int, default=None,
                           help="compile for this many tensor-parallel ranks per stage: print each parameter's "
                                "shard and a parameter segment's per-rank graph with its collectives")
        if name in ("simulate", "tune"):
            cli_tune.add_memory_args(p)
            p.add_argument("--device", default="H20", type=_device_name,
                           help=f"device preset: {', '.join(PRESETS)} (any case)")
        if name == "simulate":
            p.add_argument("--timeline", default=None, help="write a PNG timeline here")
            p.add_argument("--trace", default=None, help="write a Chrome trace (Perfetto) here")
    return ap


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--documents {text!r}: give comma-separated token counts, "
                                         f"e.g. 16384,8192,8192") from None


def _device_name(name: str) -> str:
    """``--device``: checked before anything compiles (an unknown preset is a usage error
    listing the presets)."""
    try:
        return get_device(name).name
    except HelixError:
        raise argparse.ArgumentTypeError(f"unknown device preset {name!r}; presets are "
                                         f"{', '.join(PRESETS)}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except HelixError as e:  # a user-input error: its message says what to change
        print(f"helix {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .program import compile_program

    if args.command == "tune":
        return cli_tune.run_tune(args, _model(args))
    program = compile_program(_model(args), pp_size=args.pp_size, seq_len=args.seq_len,
                              num_microbatches=args.microbatches, num_folds=args.folds,
                              recompute=args.recompute, schedule=args.schedule,
                              head_stage=args.head_stage, virtual_stages=args.virtual_stages,
                              mlp_chunks=args.mlp_chunks, document_lengths=args.documents,
                              tensor_parallel=getattr(args, "tp", None) or 1)
    if args.command == "show":
        print(program)
        print(program.schedule.picture())
        if program.tensor_parallel is not None:
            print(program.tensor_parallel_plan(args.tp).describe())
            seg = next(s for s in program.segments if s.spec.kind == "param")
            print(f"segment {seg.name} on one of the {args.tp} tp ranks:\n{seg.code}")
        return 0
    result = program.simulate(device=args.device, tp=args.tp, dp=args.dp, dp_shard=cli_tune.dp_shard(args),
                              optimizer=args.optimizer)
    print(result.summary())
    for line in result.memory_warnings():
        print(f"warning: {line}", file=sys.stderr)
    if args.timeline:
        result.write_timeline(args.timeline)
        print(f"wrote {args.timeline}")
    if args.trace:
        result.write_chrome_trace(args.trace)
        print(f"wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
