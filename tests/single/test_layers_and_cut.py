"""Layer tagging (roles) and the min-cut between pre-attention and attention."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from models_for_tests import HEADS, HF_MODELS, HIDDEN, KV_HEADS, NUM_LAYERS, build, compiled  # noqa: E402

from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.ir import meta  # noqa: E402
from helix_compiler.ir.segment import B, S  # noqa: E402
from helix_compiler.passes.attention import canonicalize_attention  # noqa: E402
from helix_compiler.passes.cut import cut_attention  # noqa: E402
from helix_compiler.passes.layers import tag_layers  # noqa: E402

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
ROLES = {"embed", "pre", "attn", "post", "final", "head"}
F64 = 8


@pytest.fixture(scope="module")
def gpt_graph():
    model, _ = build("gpt")
    cap = capture(model, seq_len=32)
    canonicalize_attention(cap.gm)
    return cap


@pytest.fixture(scope="module")
def llama_graph():
    model, _ = build("llama")
    cap = capture(model, seq_len=32)
    canonicalize_attention(cap.gm)
    return cap


def _module(node) -> str:
    stack = node.meta.get("nn_module_stack", {})
    return list(stack.values())[-1][0] if stack else ""


def _calls(gm, target, module_suffix=None):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target
            and (module_suffix is None or _module(n).endswith(module_suffix))]


def _role(n):
    return n.meta[meta.ROLE], n.meta[meta.LAYER]


def test_gpt_roles(gpt_graph):
    gm = gpt_graph.gm
    _, info = tag_layers(gm)
    assert info.num_layers == NUM_LAYERS and info.layer_fqns == ["h.0", "h.1"]
    assert {n.meta[meta.ROLE] for n in gm.graph.nodes} - {None} == ROLES
    emb = _calls(gm, aten.embedding.default)
    assert len(emb) == 2 and all(n.meta[meta.ROLE] == "embed" for n in emb)
    for layer in range(NUM_LAYERS):
        (ln1,) = _calls(gm, aten.layer_norm.default, f"h.{layer}.ln_1")
        (ln2,) = _calls(gm, aten.layer_norm.default, f"h.{layer}.ln_2")
        (qkv,) = _calls(gm, aten.linear.default, f"h.{layer}.attn.c_attn")
        (out_proj,) = _calls(gm, aten.linear.default, f"h.{layer}.attn.c_proj")
        (fc,) = _calls(gm, aten.linear.default, f"h.{layer}.c_fc")
        assert _role(ln1) == _role(qkv) == ("pre", layer + 1)
        assert _role(info.attention_nodes[layer]) == ("attn", layer + 1)
        assert _role(out_proj) == _role(ln2) == _role(fc) == ("post", layer + 1)
    (ln_f,) = _calls(gm, aten.layer_norm.default, "ln_f")
    assert ln_f.meta[meta.ROLE] == "final"
    assert info.head_matmul.meta[meta.ROLE] == "head" and info.head_matmul.target == aten.linear.default
    (loss,) = _calls(gm, aten.cross_entropy_loss.default)
    assert loss.meta[meta.ROLE] == "head"
    (arange,) = _calls(gm, aten.arange.default)
    assert arange.meta[meta.REMAT] is True and arange.meta[meta.ROLE] is None  # positions: rematerialized
    assert info.roles["attn"] >= NUM_LAYERS


def test_llama_roles_and_rope_remat(llama_graph):
    gm = llama_graph.gm
    _, info = tag_layers(gm)
    assert info.layer_fqns == ["layers.0", "layers.1"]
    assert {n.meta[meta.ROLE] for n in gm.graph.nodes} - {None} == ROLES
    for op in (aten.cos.default, aten.sin.default, aten.outer.default):  # RoPE tables: shape-only
        nodes = _calls(gm, op)
        assert nodes and all(n.meta[meta.REMAT] for n in nodes)
    for layer in range(NUM_LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj"):
            (n,) = _calls(gm, aten.linear.default, f"layers.{layer}.self_attn.{proj}")
            assert _role(n) == ("pre", layer + 1)
        for proj in ("self_attn.o_proj", "gate_proj", "up_proj", "down_proj"):
            (n,) = _calls(gm, aten.linear.default, f"layers.{layer}.{proj}")
            assert _role(n) == ("post", layer + 1)
    (head,) = _calls(gm, aten.linear.default, "lm_head")
    assert head is info.head_matmul and head.meta[meta.ROLE] == "head"
    final = [n for n in gm.graph.nodes if _module(n) == "norm" and n.op == "call_function"]
    assert final and all(n.meta[meta.ROLE] == "final" for n in final)


@pytest.mark.parametrize("name", [m for m in HF_MODELS if m.endswith("sdpa")])  # eager: test_segments
def test_hf_roles(name):
    _, _, program = compiled(name)
    gm = program.captured.gm
    assert {n.meta[meta.ROLE] for n in gm.graph.nodes} - {None} == ROLES
    assert program.layers.num_layers == NUM_LAYERS
    container = "model.transformer.h" if "gpt2" in name else "model.model.layers"  # adapter's "model." prefix
    assert program.layers.layer_fqns == [f"{container}.{i}" for i in range(NUM_LAYERS)]


def _cut(cap, seq_len, b=1):
    tag_layers(cap.gm)  # resets roles the previous cut moved
    _, cuts = cut_attention(cap.gm, to_expr=cap.to_cost_expr, seq_len=seq_len, micro_batch_size=b)
    return cuts


def _gpt_hand_bytes(b, s, h=HIDDEN):
    qkv = 3 * b * s * h * F64  # q, k, v
    ship = b * s * h * F64 + (3 * h * h + 3 * h) * F64  # LN1 output + W_qkv + b_qkv
    return qkv, ship


@pytest.mark.parametrize("b", [1, 2])
def test_gpt_long_sequence_ships_ln1_output_and_wqkv(gpt_graph, b):
    cap = gpt_graph
    cuts = _cut(cap, 8192, b)
    assert len(cuts) == NUM_LAYERS
    for layer, cut in enumerate(cuts):
        assert cut.layer == layer + 1
        assert set(cut.shipped_params) == {f"h.{layer}.attn.c_attn.weight", f"h.{layer}.attn.c_attn.bias"}
        (ln1,) = _calls(cap.gm, aten.layer_norm.default, f"h.{layer}.ln_1")
        (qkv,) = _calls(cap.gm, aten.linear.default, f"h.{layer}.attn.c_attn")
        activations = [c for c in cut.crossing if c not in {n.name for n in cap.gm.graph.nodes if n.op == "get_attr"}]
        assert activations == [ln1.name]
        assert qkv.name in cut.moved and qkv.meta[meta.ROLE] == "attn"  # QKV runs on the attention stage
        assert ln1.meta[meta.ROLE] == "pre"
        assert cut.bytes == _gpt_hand_bytes(b, 8192)[1] == b * 8192 * 64 * 8 + (3 * 64 * 64 + 192) * 8


@pytest.mark.parametrize("b", [1, 2])
def test_gpt_short_sequence_ships_q_k_v(gpt_graph, b):
    cap = gpt_graph
    cuts = _cut(cap, 32, b)
    attns = [n for n in cap.gm.graph.nodes if n.target == HELIX_ATTENTION]
    for cut, attn in zip(cuts, attns, strict=True):
        assert cut.shipped_params == () and cut.moved == ()
        assert set(cut.crossing) == {a.name for a in attn.args}
        assert cut.bytes == _gpt_hand_bytes(b, 32)[0] == 3 * b * 32 * 64 * 8


def test_gpt_cut_switches_exactly_at_the_byte_crossover(gpt_graph):
    # q,k,v: 1536 s bytes; LN1 out + W_qkv + b_qkv: 512 s + 99840 bytes -> equal at s = 97.5
    for s, ships_weights in ((97, False), (98, True)):
        qkv, ship = _gpt_hand_bytes(1, s)
        assert (ship < qkv) == ships_weights
        for cut in _cut(gpt_graph, s):
            assert bool(cut.shipped_params) == ships_weights, (s, cut)
            assert cut.bytes == min(qkv, ship)


def test_llama_cut_long_and_short(llama_graph):
    cap = llama_graph
    h, kv = HIDDEN, HIDDEN // HEADS * KV_HEADS
    w_bytes = (h * h + 2 * kv * h) * F64
    long = _cut(cap, 8192)
    for layer, cut in enumerate(long):
        assert set(cut.shipped_params) == {f"layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"}
        params = {n.name for n in cap.gm.graph.nodes if n.op == "get_attr"}
        (act,) = [c for c in cut.crossing if c not in params]
        node = next(n for n in cap.gm.graph.nodes if n.name == act)
        assert _module(node) == f"layers.{layer}.input_layernorm"  # the RMSNorm output
        assert cut.bytes == 8192 * h * F64 + w_bytes
        for p in "qkv":
            (lin,) = _calls(cap.gm, aten.linear.default, f"layers.{layer}.self_attn.{p}_proj")
            assert lin.name in cut.moved
    short = _cut(cap, 32)
    attns = [n for n in cap.gm.graph.nodes if n.target == HELIX_ATTENTION]
    for cut, attn in zip(short, attns, strict=True):
        assert cut.shipped_params == ()
        assert set(cut.crossing) == {a.name for a in attn.args}  # q, k after RoPE, v: kv heads only
        assert cut.bytes == 32 * h * F64 + 2 * 32 * kv * F64


def test_program_reports_the_cut_per_layer():
    _, _, program = compiled("gpt", 8192)
    text = str(program)
    for cut in program.cuts:
        assert cut.bytes == _gpt_hand_bytes(1, 8192)[1]
        assert f"layer {cut.layer}: pre-owner -> attention stage sends" in text
        assert f"({cut.bytes / 2**20:.3f} MB)" in text
    assert {B, S} >= set().union(*(s.cost.flops_fwd.free_symbols for s in program.segments))
