"""The parts of the ``helix`` command line beyond built-in shapes: the user's own model
(``--hf-config``, ``--hf`` with ``--set``, ``--module``) and ``helix tune`` (the schedule
search of ``tune.py``: a ranked table and a picture).

Every model is built under ``torch.device("meta")``: shapes and dtypes only, no weights, so a
7B model compiles in seconds on a laptop (capture runs ``torch.export`` on meta tensors).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from .errors import HelixError
from .ir.segment import POLICIES
from .tune import KINDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the user's own model (instead of --model)")
    g.add_argument("--hf-config", default=None, metavar="PATH",
                   help="a Hugging Face config.json (or its folder): the causal LM it describes")
    g.add_argument("--hf", default=None, metavar="MODEL_TYPE",
                   help="a transformers model type (llama, qwen2, mistral, gpt2, ...) built from its default "
                        "config with --set overrides")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Hugging Face config field (repeatable; VALUE parsed as JSON, else a string), "
                        "e.g. --set num_hidden_layers=28")
    g.add_argument("--module", default=None, metavar="PKG.MOD:FUNCTION",
                   help="a function returning the model (called with no arguments under torch.device('meta'))")


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per step per pipeline (default: 2 x pp-size sequences); the micro batch count M "
                        "is searched with M x micro batch size x seq-len = this")
    p.add_argument("--memory-limit", default="device", type=_memory_limit, metavar="GB|device|none",
                   help="peak memory per rank allowed (default: the device preset's memory)")
    p.add_argument("--schedules", type=_names(KINDS), default=KINDS, metavar="K1,K2",
                   help=f"schedule kinds to search (default: all of {','.join(KINDS)})")
    p.add_argument("--folds", type=_ints, default=(1, 2), metavar="F1,F2", help="helix fold counts (default 1,2)")
    p.add_argument("--recompute", type=_names(POLICIES), default=POLICIES, metavar="P1,P2",
                   help=f"recompute policies (default: all of {','.join(POLICIES)})")
    p.add_argument("--mlp-chunks", type=_optional_ints, default=None, metavar="none,16",
                   help="MLP chunk counts ('none' = unchunked; default: none and about 8192 tokens per chunk)")
    p.add_argument("--head-stage", type=_head_stages, default=(0, "auto"), metavar="0,auto",
                   help="helix head placements to search: stage numbers (0: with the embedding) and/or auto "
                        "(the least loaded stage); default 0,auto")
    p.add_argument("--virtual-stages", type=_ints, default=None, metavar="V1,V2",
                   help="interleaved virtual stage counts (default: every valid one)")
    p.add_argument("--microbatches", type=_ints, default=None, metavar="M1,M2",
                   help="micro batch counts to try (default: every divisor of the step's sequences)")
    p.add_argument("--all", action="store_true", help="simulate every candidate (no pruning by lower bounds)")
    p.add_argument("--top", type=int, default=30, help="rows of the table to print (default 30)")
    p.add_argument("--picture", default="tune.png", help="write the picture here (default tune.png; '' for none)")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory per rank (sim.memory)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage (divides sharded weights, "
                                                     "activations and, in tune, durations)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    g.add_argument("--dp-shard", nargs="?", const="gradients", default=None, choices=("gradients", "optimizer"),
                   help="shard over dp: optimizer state and gradients (ZeRO-2; the default of the bare flag) or "
                        "'optimizer' only (ZeRO-1, runtime.zero)")
    g.add_argument("--optimizer", default="auto", choices=("auto", "adam_bf16", "adam_fp32"),
                   help="bytes per parameter: adam_bf16 2+2+12, adam_fp32 4+4+8 (auto: from the dtype)")


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        out = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return out
    return parse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 2,4") from None


def _optional_ints(text: str) -> tuple[int | None, ...]:
    try:
        return tuple(None if x.strip().lower() == "none" else int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers or 'none', e.g. none,16") from None


def _head_stages(text: str) -> tuple:
    try:
        return tuple(0 if x in ("0", "none") else x if x == "auto" else int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give stage numbers and/or 'auto', e.g. 0,auto") from None


def head_stage(text: str):
    """``--head-stage`` of show / simulate: a stage or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head-stage {text!r}: give a stage number or 'auto'") from None


def _memory_limit(text: str):
    if text.lower() in ("device", "none"):
        return None if text.lower() == "none" else "device"
    try:
        return float(text) * 1e9
    except ValueError:
        raise argparse.ArgumentTypeError(f"--memory-limit {text!r}: give GB per rank, 'device' or 'none'") from None


def dp_shard(args) -> bool | str:
    """``--dp-shard`` as ``sim.memory`` takes it."""
    return {None: False, "gradients": True, "optimizer": "optimizer"}[args.dp_shard]


# ------------------------------------------------------------------------------ models
def has_model_source(args) -> bool:
    return bool(getattr(args, "hf_config", None) or getattr(args, "hf", None) or getattr(args, "module", None))


def build_model(args, dtype: torch.dtype) -> torch.nn.Module:
    """The model named by ``--hf-config`` / ``--hf`` (+ ``--set``) / ``--module``, on the meta
    device, in ``dtype``."""
    given = [f for f in ("hf_config", "hf", "module") if getattr(args, f, None)]
    if len(given) > 1:
        raise HelixError(f"give one model source, got {', '.join('--' + g.replace('_', '-') for g in given)}")
    if args.set and not (args.hf_config or args.hf):
        raise HelixError("--set overrides a Hugging Face config: use it with --hf or --hf-config")
    if args.module:
        return _from_module(args.module).to(dtype)
    return _from_hf(args, dtype)


def _from_module(spec: str) -> torch.nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise HelixError(f"--module {spec!r}: give 'package.module:function' (a function returning the model)")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise HelixError(f"--module {spec!r}: cannot load it ({type(e).__name__}: {e}); is the package on "
                         f"PYTHONPATH?") from None
    with torch.device("meta"):
        model = fn()
    if not isinstance(model, torch.nn.Module):
        raise HelixError(f"--module {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _parse_overrides(pairs) -> dict:
    out = {}
    for item in pairs:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise HelixError(f"--set {item!r}: give KEY=VALUE, e.g. --set num_hidden_layers=28")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _from_hf(args, dtype: torch.dtype) -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise HelixError("--hf / --hf-config need the transformers package (pip install transformers)") from None
    overrides = _parse_overrides(args.set)
    if args.hf_config:
        path = Path(args.hf_config)
        path = path / "config.json" if path.is_dir() else path
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HelixError(f"--hf-config {str(path)!r}: cannot read it ({e})") from None
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise HelixError(f"--hf-config {str(path)!r} has no 'model_type'; is it a transformers config.json?")
        fields.update(overrides)
    else:
        model_type, fields = args.hf, overrides
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as e:
        known = sorted(transformers.CONFIG_MAPPING.keys())
        raise HelixError(f"Hugging Face model type {model_type!r}: {e}; known types include "
                         f"{', '.join(k for k in known if k in ('llama', 'qwen2', 'mistral', 'gpt2', 'gemma2'))} "
                         f"(all {len(known)} in transformers.CONFIG_MAPPING)") from None
    cfg.use_cache = False
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # older transformers: torch_dtype
            return transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
        except ValueError as e:
            raise HelixError(f"Hugging Face model type {model_type!r} has no causal LM class: {e}") from None


# ------------------------------------------------------------------------------ tune
def run_tune(args, model: torch.nn.Module) -> int:
    from .program import compile_program
    from .tune import search_schedules

    tokens = args.tokens_per_step or 2 * args.pp_size * args.seq_len
    if tokens % args.seq_len:
        raise HelixError(f"--tokens-per-step {tokens} must be a multiple of --seq-len {args.seq_len} (whole "
                         f"sequences per step)")
    # compiled once (capture, cut, segments, costs; costs are symbolic in the micro batch size):
    # every candidate reuses it, the schedule built here is not one of them
    program = compile_program(model, pp_size=args.pp_size, seq_len=args.seq_len, num_microbatches=1, num_folds=1,
                              schedule="gpipe", recompute="none", document_lengths=args.documents)
    choice = search_schedules(program, device=args.device, memory_limit=args.memory_limit, tokens_per_step=tokens,
                              tp=args.tp, dp=args.dp, dp_shard=dp_shard(args), optimizer=args.optimizer,
                              schedules=args.schedules, folds=args.folds, recompute=args.recompute,
                              mlp_chunks=args.mlp_chunks, head_stages=args.head_stage,
                              virtual_stages=args.virtual_stages, num_microbatches=args.microbatches,
                              exhaustive=args.all)
    print(choice.table(top=args.top))
    if args.picture:
        choice.write_picture(args.picture)
        print(f"wrote {args.picture}")
    if choice.chosen is None:
        print("helix tune: no runnable candidate fits the memory limit; use more stages, --tp, --dp-shard or a "
              "larger --memory-limit", file=sys.stderr)
        return 1
    return 0
