"""The tensor-parallel rewrite of the segment graphs (``passes.tensor_parallel``), without
processes: collectives where Megatron puts them, per-rank shapes everywhere (parameters,
boundaries, node metadata), per-rank FLOPs, and named errors for what it cannot split.
Numerical parity over real tp groups is in tests/multiprocess/test_tensor_parallel.py."""

from __future__ import annotations

import models_for_tests as M
import pytest
import sympy
import torch

from helix_compiler import compile_program
from helix_compiler.errors import HelixError, UnsupportedModelError
from helix_compiler.ir.segment import B, S
from helix_compiler.ir.tensor_parallel import Sharded
from helix_compiler.kernels.tensor_parallel import (
    sp_all_gather,
    sp_gather,
    sp_reduce_scatter,
    tp_copy,
    tp_reduce,
    vocab_parallel_cross_entropy,
)
from helix_compiler.lowering.stage_program import lower_program
from helix_compiler.models import Llama, LlamaAttention, LlamaConfig, RMSNorm

MODELS = ("llama", "gpt", "hf_gpt2_sdpa", "hf_qwen2_sdpa", "hf_llama_eager")


def _compile(name, tp, **kw):
    model, loss_fn = M.build(name, num_layers=2)
    return model, compile_program(model, pp_size=2, seq_len=32, loss_fn=loss_fn, tensor_parallel=tp, **kw)


def _calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


MODES = {"sp-vocab": (True, True), "vocab": (False, True), "sp": (True, False), "plain": (False, False)}
# every mode on a model with separate q/k/v (GQA) and on one with a fused, tied, Conv1D layout;
# the default (sequence and vocabulary parallelism) on the others
CASES = [(n, m) for n in ("llama", "hf_gpt2_sdpa") for m in MODES] + [(n, "sp-vocab") for n in MODELS[2:]
                                                                     if n != "hf_gpt2_sdpa"] + [("gpt", "sp-vocab")]


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_collectives_where_megatron_puts_them_and_per_rank_costs(name, mode):
    sp, vocab = MODES[mode]
    _, ref = _compile(name, 1)
    _, prog = _compile(name, 2, sequence_parallel=sp, vocab_parallel=vocab)
    count = lambda fn: sum(len(_calls(s.gm, fn)) for s in prog.segments)  # noqa: E731
    # attention and MLP of each of the 2 layers: f before, g after, and with vocabulary
    # parallelism a g after the embedding and an f before the head; under sequence
    # parallelism f all-gathers the sequence and g reduce-scatters it (the first f stays a
    # tp_copy when the embedding is replicated: its input is whole on every rank)
    f = 4 + vocab
    g = 4 + vocab
    got = (count(tp_copy), count(sp_all_gather), count(tp_reduce), count(sp_reduce_scatter))
    if sp:
        assert got == ((0, f, 0, g) if vocab else (1, f - 1, 0, g)), got
        assert len(_calls(prog.segments[-1].gm, sp_gather)) == (0 if vocab else 1)
    else:
        assert got == (f, 0, g, 0), got
    assert len(_calls(prog.segments[-1].gm, vocab_parallel_cross_entropy)) == vocab
    for seg, base in zip(prog.segments, ref.segments, strict=True):
        seg.gm.graph.lint()
        if seg.spec.kind == "head" and not vocab:  # a replicated head: every tp rank computes it whole
            assert sympy.simplify(seg.cost.flops_fwd - base.cost.flops_fwd) == 0
        else:  # every matmul and attention of the layers (and the head) is split in two
            assert sympy.simplify(2 * seg.cost.flops_fwd - base.cost.flops_fwd) == 0, seg.name
    assert ("sp_reduce_scatter(" if sp else "tp_reduce(") in prog.segment("P1").code
    assert prog.passes[[r.name for r in prog.passes].index("shard_tensor_parallel")].nodes_after > 0


@pytest.mark.parametrize("name", MODELS)
def test_lowered_shards_and_boundaries_are_one_ranks(name):
    model, prog = _compile(name, 2)
    full = dict(model.named_parameters())
    plan = {p.name: p for p in prog.tensor_parallel_plan(2).params}
    for rank in (0, 1):
        stages = lower_program(prog, tp_rank=rank)
        for st in stages:
            assert st.tp_size == 2 and st.tp_rank == rank and st.tp_group_key == "tp"
            for fqn, p in st.params.items():
                assert tuple(p.shape) == plan[fqn].shard, fqn
                sh = st.tp_shards.get(fqn)
                want = full[fqn].detach() if sh is None else sh.local(full[fqn].detach(), rank, 2)
                assert torch.equal(p.detach(), want), fqn
                assert p is not full[fqn] or sh is None  # split parameters are new tensors
        # what one rank receives is what the sending rank's graph makes, at the compiled sizes
        env = {B: 1, S: 32}
        for seg in prog.segments:
            for node, (shape, _) in zip([n for n in seg.gm.graph.nodes if n.op == "placeholder"],
                                        seg.input_meta, strict=False):
                got = [int(sympy.sympify(prog.captured.to_cost_expr(d)).subs(env)) for d in node.meta["val"].shape]
                assert got == [int(sympy.sympify(d).subs(env)) for d in shape], (seg.name, node.name)


def test_fused_qkv_is_split_per_head_group():
    sh = Sharded(0, groups=3)
    full = torch.arange(12.0).reshape(12, 1)  # q rows 0-3, k rows 4-7, v rows 8-11
    pieces = [sh.local(full, r, 2) for r in (0, 1)]
    assert pieces[0].flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert torch.equal(sh.unshard(pieces), full)


class _FullQNorm(LlamaAttention):
    """OLMo2-style: q normalized over the whole projected width before the heads split."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.q_norm = RMSNorm(cfg.heads * self.head_dim, cfg.eps)

    def forward(self, x, cos, sin, keep=None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def test_what_cannot_be_split_is_named():
    with pytest.raises(UnsupportedModelError, match=r"K/V heads.*replicated on 2 ranks.*divides 2"):
        _compile("llama", 4)  # 2 K/V heads over 4 ranks
    with pytest.raises(HelixError, match="mlp_chunks=2 with tensor_parallel=2"):
        _compile("llama", 2, mlp_chunks=2)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(num_layers=2)).double()
    for block in model.layers:
        attn = _FullQNorm(model.cfg).double()
        attn.load_state_dict(block.self_attn.state_dict(), strict=False)
        block.self_attn = attn
    with pytest.raises(UnsupportedModelError, match=r"segment \w+: .*reduces over the split dimension"):
        compile_program(model, pp_size=2, seq_len=32, tensor_parallel=2)


def test_sequence_parallel_boundaries_and_partial_gradients():
    _, prog = _compile("hf_gpt2_sdpa", 2)
    tp = prog.tensor_parallel
    assert tp.sequence_parallel
    p1 = prog.segment("P1")
    (hidden, hdtype), *_ = p1.output_meta  # the residual stream leaves P1 as a sequence part
    assert sympy.simplify(sympy.sympify(hidden[1]) - S / 2) == 0
    # norms and the biases added after row-parallel matmuls: each rank computes a part
    names = {prog.captured.user_fqn(n) for n in tp.partial_grads}
    assert "transformer.h.0.ln_2.weight" in names and "transformer.h.0.attn.c_proj.bias" in names
    assert "transformer.wte.weight" not in names  # split by vocabulary: each rank's rows, exact gradients
    assert {"transformer.wte.weight", "lm_head.weight"} & {prog.captured.user_fqn(n) for n in tp.param_shards}
    with pytest.raises(HelixError, match="micro_batch_size=1"):
        _compile("llama", 2, micro_batch_size=2)
    with pytest.raises(HelixError, match="seq_len=33 must be a multiple of tensor_parallel=2"):
        compile_program(M.build("llama")[0], pp_size=2, seq_len=33, tensor_parallel=2)


def test_vocabulary_that_tp_does_not_divide_is_named():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(num_layers=2, vocab_size=255)).double()
    with pytest.raises(UnsupportedModelError, match=r"255 rows\) does not split over tp=2.*vocab_parallel=False"):
        compile_program(model, pp_size=2, seq_len=32, tensor_parallel=2)
    compile_program(model, pp_size=2, seq_len=32, tensor_parallel=2, vocab_parallel=False)
