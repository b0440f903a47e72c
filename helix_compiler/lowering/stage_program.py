"""Lowering: a compiled program -> one frozen :class:`~helix_compiler.ir.stage_program.StageProgram`
per rank, the seam between compiler and runtime (ARCHITECTURE.md section 7).

Everything the executor would otherwise work out or patch at run time happens here, once:
concrete message shapes (the cost model's sympy shapes at the compiled sizes), the split
into forward and backward halves, the forward-only program for evaluation, run-time graph
rewrites (attention record/replay, an eval twin without dropout), parameter ownership under
the user's names, and a fingerprint that every rank must agree on. Instruction kinds the
executor cannot run are rejected here, before any process group is touched.
"""

from __future__ import annotations

import hashlib

import sympy
import torch
import torch.fx as fx

from ..errors import HelixError
from ..ir.schedule import Instr, RankProgram
from ..ir.segment import B, S
from ..ir.stage_program import SharedParam, StageProgram, StageSegment
from ..ir.tensor_parallel import Sharded
from ..kernels import attention_replay
from ..passes.tensor_parallel_plan import depends_on
from .device_neutral import make_device_neutral, neutral_token_count
from .ownership import owned_state

HELIX_ATTENTION = torch.ops.helix.attention.default
aten = torch.ops.aten
RUNNABLE_OPS = ("F", "B", "R", "SEND", "RECV", "FREE")
DEFAULT_IGNORE_INDEX = -100


def lower_program(program, *, tp_rank: int = 0) -> tuple[StageProgram, ...]:
    """One :class:`StageProgram` per rank of ``program`` (a ``HelixProgram``). A program
    compiled with ``tensor_parallel > 1`` lowers for one tp rank: its segments hold that
    rank's shard of every split parameter (``ir.tensor_parallel.Sharded``)."""
    cfg, sched = program.config, program.schedule
    if sched is None:
        raise HelixError("lower_program: the program has no schedule")
    bad = sorted({i.op for p in sched.programs for i in p if i.op not in RUNNABLE_OPS})
    if bad:
        raise HelixError(
            f"schedule={cfg.schedule!r} uses instruction kinds {bad} (split backward) that the "
            f"runtime does not run; run it in the simulator (compile_program(...).simulate()) "
            f"or pick schedule='helix', '1f1b', 'gpipe' or 'interleaved'")
    env = {B: cfg.micro_batch_size, S: cfg.seq_len}
    chain = tuple(s.name for s in program.segments)
    head = chain[-1]
    out_specs = {s.name: tuple((tuple(int(sympy.sympify(d).subs(env)) for d in shape), dtype)
                               for shape, dtype in s.output_meta) for s in program.segments}
    shards = TensorParallelShards(program, tp_rank)
    run_segments = {s.name: _stage_segment(s, out_specs[s.name], shards) for s in program.segments}
    splits = [split_point(p, head) for p in sched.programs]
    forward_first = all(_all_forward_first(p, head, k) for p, k in zip(sched.programs, splits, strict=True))
    head_rank = next(p.rank for p in sched.programs if any(i.op == "F" and i.seg == head for i in p))
    owned_by_rank = [_params_on(program, p) for p in sched.programs]
    holders: dict[str, list[int]] = {}
    for r, names in enumerate(owned_by_rank):
        for n in names:
            holders.setdefault(n, []).append(r)
    params = dict(program.captured.module.named_parameters())  # first name of each tied weight
    fqn = program.captured.user_fqn
    originals, params = params, {n: shards.value(p) for n, p in params.items()}
    shared = {fqn(n): SharedParam(tuple(rs), tuple(params[n].shape), params[n].dtype)
              for n, rs in sorted(holders.items()) if len(rs) > 1}
    vocab, ignore_index = _token_ranges(program)
    fingerprint = _fingerprint(program)
    out = []
    for prog, split, owned in zip(sched.programs, splits, owned_by_rank, strict=True):
        runs = {i.seg for i in prog if i.op == "F"}
        recv_specs = {}
        for i in prog:
            if i.op == "RECV":
                specs = out_specs[i.seg]
                if i.value == "bwd":
                    specs = tuple(s for s in specs if s[1].is_floating_point)
                recv_specs[(i.value, i.seg)] = specs
        out.append(StageProgram(
            rank=prog.rank, num_ranks=len(sched.programs), kind=sched.kind, recompute=cfg.recompute,
            instrs=tuple(prog.instrs), forward_only=forward_only(prog), split=split,
            forward_first=forward_first, chain=chain,
            segments={n: run_segments[n] for n in chain if n in runs}, recv_specs=recv_specs,
            owned_state=owned_state(program, {n: run_segments[n] for n in chain if n in runs}),
            params={fqn(n): params[n] for n in owned},
            shared=shared,
            head_rank=head_rank,
            preview_loss=any(i.op == "F" and i.seg == head for i in prog.instrs[split:]),
            num_microbatches=cfg.num_microbatches, micro_batch_size=cfg.micro_batch_size,
            seq_len=cfg.seq_len, input_names=tuple(program.captured.input_names),
            vocab_size=vocab, ignore_index=ignore_index, fingerprint=fingerprint,
            token_count=neutral_token_count(program.token_count), **_document_inputs(program),
            **shards.stage_fields({fqn(n): originals[n] for n in owned})))
    return tuple(out)


# ------------------------------------------------------------------------------ the split
def split_point(program: RankProgram, head: str) -> int:
    """Index of the rank's first backward-half instruction: the first B/I/W/R, backward
    RECV, or forward of the head whose backward follows at once (HelixPipe runs the head at
    the start of a micro batch's backward). Receives of final hidden states stay in the
    forward half: forward() previews the loss from them."""
    instrs = program.instrs
    for k, i in enumerate(instrs):
        head_in_bwd = i.op == "F" and i.seg == head and _next_compute_is_head_backward(instrs, k, head)
        if i.op in ("B", "I", "W", "R") or (i.op == "RECV" and i.value == "bwd") or head_in_bwd:
            return k
    return len(instrs)


def _all_forward_first(program: RankProgram, head: str, split: int) -> bool:
    """No forward (but the head's) after the split: the program splits into a forward half
    and a backward half (helix, GPipe), unlike 1F1B."""
    return not any(i.op == "F" and i.seg != head for i in program.instrs[split:])


def _next_compute_is_head_backward(instrs, k: int, head: str) -> bool:
    for i in instrs[k + 1:]:
        if i.is_compute:
            return i.op == "B" and i.seg == head
    return False


def forward_only(program: RankProgram) -> tuple[Instr, ...]:
    """The rank's program without backward: its forwards, forward messages and frees of
    forward buffers, in schedule order (evaluation under ``torch.no_grad``). Dropping
    instructions only removes waits (sends are asynchronous), so a schedule that is
    deadlock-free stays so; the per-pair message order is unchanged."""
    keep = []
    for i in program.instrs:
        if i.op == "F" or (i.op in ("SEND", "RECV", "FREE") and i.value == "fwd"):
            keep.append(i)
    return tuple(keep)


# ------------------------------------------------------------------------------ segments
def _stage_segment(seg, output_specs, shards: TensorParallelShards) -> StageSegment:
    gm = _copy(seg.gm, shards.root(seg.gm))
    route_attention(gm)
    make_device_neutral(gm)  # a meta- or CPU-captured graph runs on the rank's device
    uses_rng = any(_is_random(n) for n in gm.graph.nodes)
    eval_gm = without_dropout(gm) if uses_rng else gm
    return StageSegment(name=seg.name, kind=seg.spec.kind, gm=gm, eval_gm=eval_gm,
                        user_inputs=tuple(seg.user_inputs), output_specs=output_specs,
                        uses_rng=uses_rng)


def _copy(gm: fx.GraphModule, root=None) -> fx.GraphModule:
    """A new graph over the same parameters (the compiled program's graph stays as it is),
    or over ``root``'s (a dict of attribute values: one tp rank's shards)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}), type_expr=None)
    new = fx.GraphModule(gm if root is None else root, graph, class_name=type(gm).__name__)
    new.meta = dict(gm.meta)
    return new


def route_attention(gm: fx.GraphModule) -> int:
    """Pass: route the graph's ``helix::attention`` nodes through the run-time
    record/replay function (``kernels.attention_replay``); returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (HELIX_ATTENTION, attention_replay.attention):
            node.target = attention_replay.attention
            count += 1
    gm.recompile()
    return count


def _is_random(node: fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and (
        torch.Tag.nondeterministic_seeded in t.tags or t in (aten.dropout.default, aten.feature_dropout.default))


def without_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: the evaluation twin of a training graph: every dropout is the identity. Any
    other random op is an error (its eval behaviour is not known here)."""
    new = _copy(gm)
    for node in list(new.graph.nodes):
        if not _is_random(node):
            continue
        if node.target in (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default):
            node.replace_all_uses_with(node.args[0])
            new.graph.erase_node(node)
        else:
            raise HelixError(f"segment graph has a random op {node.format_node()} that is not dropout; "
                             f"its evaluation-mode behaviour is unknown, so pipe.eval() cannot switch it off")
    new.graph.lint()
    new.recompile()
    return new


# ------------------------------------------------------------------------------ parameters
class TensorParallelShards:
    """One tp rank's parameters: its shard of every split parameter (one new Parameter per
    parameter object, whichever name a graph uses for it, shared by every segment and rank
    program), the others as they are. Without tensor parallelism everything is the user's
    own objects."""

    def __init__(self, program, tp_rank: int):
        self.tp = program.tensor_parallel
        self.rank = tp_rank
        self.local: dict[int, torch.Tensor] = {}
        self.split: dict[int, Sharded] = {}  # id(parameter) -> its split
        self.partial: set[int] = set()  # id(parameter) of those whose gradients are summed over tp
        if self.tp is not None:
            if not 0 <= tp_rank < self.tp.tp:
                raise HelixError(f"tp_rank={tp_rank} is not a rank of tp={self.tp.tp}")
            gm = program.captured.gm
            self.split = {id(gm.get_parameter(n)): sh for n, sh in self.tp.param_shards.items()}
            self.partial = {id(gm.get_parameter(n)) for n in self.tp.partial_grads}

    def value(self, p: torch.Tensor) -> torch.Tensor:
        sh = self.split.get(id(p))
        if sh is None:
            return p
        if id(p) not in self.local:
            piece = sh.local(p.detach(), self.rank, self.tp.tp).clone()
            self.local[id(p)] = torch.nn.Parameter(piece, requires_grad=p.requires_grad)
        return self.local[id(p)]

    def root(self, gm: fx.GraphModule):
        if self.tp is None:
            return None
        targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        return {t: self.value(_attr(gm, t)) for t in targets}

    def stage_fields(self, owned: dict[str, torch.Tensor]) -> dict:
        """``owned``: the rank's parameters by the user's names (the user's objects)."""
        if self.tp is None:
            return {}
        return {"tp_size": self.tp.tp, "tp_rank": self.rank, "tp_group_key": self.tp.group_key,
                "tp_shards": {n: self.split[id(p)] for n, p in owned.items() if id(p) in self.split},
                "tp_partial_grads": tuple(sorted(n for n, p in owned.items() if id(p) in self.partial))}


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _params_on(program, prog: RankProgram) -> list[str]:
    """Canonical names (first name of each parameter object) of the parameters a rank uses."""
    gm = program.captured.gm
    params = dict(program.captured.module.named_parameters())
    canonical = {id(p): n for n, p in params.items()}
    segs = {i.seg for i in prog if i.op == "F"}
    used = {canonical[id(gm.get_parameter(p))] for s in program.segments if s.name in segs for p in s.params}
    return [n for n in params if n in used]


def _token_ranges(program) -> tuple[int | None, int]:
    """The vocabulary size (rows of the embedding the token ids index) and the loss's
    ignore_index, read from the captured graph."""
    gm = program.captured.gm
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    vocab = None
    ignore = DEFAULT_IGNORE_INDEX
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if vocab is None and n.target == aten.embedding.default and depends_on(n.args[1], ids):
            vocab = int(n.args[0].meta["val"].shape[0])
        if n.target in (aten.cross_entropy_loss.default, aten.nll_loss_forward.default, aten.nll_loss.default,
                        aten.nll_loss2d_forward.default):
            schema = n.target._schema.arguments
            names = [a.name for a in schema]
            if "ignore_index" in names:
                k = names.index("ignore_index")
                ignore = int(n.args[k]) if k < len(n.args) else int(n.kwargs.get("ignore_index", ignore))
    return vocab, ignore


def _document_inputs(program) -> dict[str, tuple[str, ...]]:
    """The user inputs the attention's document ids come from, by role (see
    ``helix::document_ids(position_ids, segment_ids, attention_mask)``)."""
    docs = [n for n in program.captured.gm.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.helix.document_ids.default]
    names = lambda k: tuple(sorted({n.args[k].name for n in docs if n.args[k] is not None}))  # noqa: E731
    return {"document_inputs": names(1), "padding_inputs": names(2)}


def _fingerprint(program) -> str:
    """Identical on ranks that compiled the same program: the config, the schedule text and
    every segment's code."""
    h = hashlib.sha256()
    h.update(repr(program.config).encode())
    h.update(str(program.schedule).encode())
    for s in program.segments:
        h.update(s.gm.code.encode())
    return h.hexdigest()[:16]
