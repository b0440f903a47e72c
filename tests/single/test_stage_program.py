"""The compiler/runtime seam: ``lower_program`` -> frozen per-rank ``StageProgram``s, and
``HelixProgram.reschedule``. No process group needed."""

from __future__ import annotations

import ast
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helix_compiler import HelixError, compile_program  # noqa: E402
from helix_compiler.lowering.stage_program import forward_only, lower_program  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402
from helix_compiler.sim.costs import OpTimes  # noqa: E402
from helix_compiler.sim.engine import simulate_times  # noqa: E402

SEQ = 32
RUNTIME = Path(__file__).resolve().parents[2] / "helix_compiler" / "runtime"


@pytest.fixture(scope="module")
def program():
    torch.manual_seed(0)
    return compile_program(Llama(LlamaConfig(num_layers=4)), pp_size=2, seq_len=SEQ, num_microbatches=4)


def test_stage_programs_carry_concrete_shapes_and_the_rank_s_own_segments(program):
    stages = lower_program(program)
    assert [s.rank for s in stages] == [0, 1]
    for st in stages:
        assert st.instrs == tuple(program.schedule.programs[st.rank].instrs)
        assert set(st.segments) == {i.seg for i in st.instrs if i.op == "F"}
        for (value, seg), specs in st.recv_specs.items():
            assert all(isinstance(d, int) for shape, _ in specs for d in shape), (value, seg, specs)
        # a forward boundary carries the residual stream [b, s, h] at the compiled sizes
        fwd = [specs for (value, _), specs in st.recv_specs.items() if value == "fwd"]
        assert any((1, SEQ, 64) == shape for specs in fwd for shape, _ in specs)
    owned = [set(st.params) for st in stages]
    assert owned[0].isdisjoint(owned[1])  # Llama's head is untied: nothing shared
    assert owned[0] | owned[1] == {n for n, _ in Llama(LlamaConfig(num_layers=4)).named_parameters()}
    assert len({st.fingerprint for st in stages}) == 1
    assert stages[0].vocab_size == 256 and stages[0].ignore_index == -100


def test_tied_weights_are_shared_with_their_holders():
    torch.manual_seed(0)
    prog = compile_program(GPT(GPTConfig(num_layers=2, max_seq_len=SEQ)), pp_size=2, seq_len=SEQ,
                           num_microbatches=4, head_stage=1)
    stages = lower_program(prog)
    assert stages[0].shared == stages[1].shared
    (name, shared), = stages[0].shared.items()
    assert name == "wte.weight" and shared.holders == (0, 1) and shared.shape == (256, 64)


def test_forward_only_programs_are_forward_subsequences_that_still_validate(program):
    fwd = [forward_only(p) for p in program.schedule.programs]
    for p, f in zip(program.schedule.programs, fwd, strict=True):
        assert all(i.op == "F" or i.value == "fwd" for i in f)
        assert [i for i in p.instrs if i in f] == list(f)  # order kept
        assert sum(i.op == "F" for i in f) == sum(i.op == "F" for i in p.instrs)  # head included
    # every message still meets its receive in FIFO order and nothing deadlocks (the simulator
    # raises on either); the validator proper insists on backwards
    sched = program.schedule.replace_programs([list(f) for f in fwd], "forward_only")
    res = simulate_times(sched, OpTimes.uniform(len(sched.specs)))
    assert len(res.messages) == sum(i.op == "SEND" for f in fwd for i in f)


def test_instructions_the_runtime_cannot_run_are_rejected_when_lowering():
    torch.manual_seed(0)
    prog = compile_program(Llama(LlamaConfig(num_layers=4)), pp_size=2, seq_len=SEQ, num_microbatches=4,
                           schedule="zb1p")
    with pytest.raises(HelixError, match=r"\['I', 'W'\].*simulator"):
        lower_program(prog)


def test_eval_twin_drops_dropout_only_where_there_is_dropout(program):
    for st in lower_program(program):
        for seg in st.segments.values():
            assert not seg.uses_rng and seg.eval_gm is seg.gm


def test_reschedule_equals_compiling_with_those_options(program):
    torch.manual_seed(0)
    direct = compile_program(Llama(LlamaConfig(num_layers=4)), pp_size=2, seq_len=SEQ, num_microbatches=8,
                             num_folds=1, recompute="full", schedule="1f1b")
    again = program.reschedule(num_microbatches=8, num_folds=1, recompute="full", schedule="1f1b")
    assert str(again.schedule) == str(direct.schedule)
    assert again.segments is program.segments and str(program.schedule) != str(again.schedule)
    assert [r.name for r in again.passes].count("build_schedule") == 1
    with pytest.raises(HelixError, match="seq_len"):
        program.reschedule(seq_len=64)
    with pytest.raises(HelixError, match="num_microbatches=6"):
        program.reschedule(num_microbatches=6)


def test_the_runtime_never_imports_the_compiler():
    """ARCHITECTURE.md 7: the runtime depends on ir/ and kernels/ only."""
    banned = {"program", "passes", "lowering", "capture", "cost", "sim", "sympy", "compile"}
    for path in sorted(RUNTIME.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                top = parts[0] if node.level == 0 else (parts[0] if node.level == 2 else "")
                assert top not in banned, f"{path.name} imports {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in banned, f"{path.name} imports {alias.name}"
