"""Capturing a deep model from three exported blocks equals exporting every block."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models_for_tests import (  # noqa: E402
    batch,
    hf_loss,
    loss_and_grads,
    max_grad_err,
    nope_llama,
    rel_err,
    smollm3,
)

from helix_compiler import compile_program  # noqa: E402
from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.capture.replicate import find_uniform_layers  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, hf_model  # noqa: E402
from helix_compiler.passes.segment import run_chain  # noqa: E402


class IndexScaledBlock(torch.nn.Module):
    """A block whose behaviour depends on its index: replication must not hide that."""

    def __init__(self, index: int, hidden: int):
        super().__init__()
        self.index = index
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, 2, c // 2).transpose(1, 2) for y in self.qkv(x).split(c, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(b, t, c)) * (self.index + 1)


class IndexScaled(torch.nn.Module):
    def __init__(self, layers: int = 5, hidden: int = 16, vocab: int = 64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList(IndexScaledBlock(i, hidden) for i in range(layers))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = blk(x)
        return torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())


MODELS = {
    "gpt": lambda: GPT(GPTConfig(num_layers=6, max_seq_len=64)),
    "llama": lambda: Llama(LlamaConfig(num_layers=6)),
    "hf_llama": lambda: hf_model("llama", num_layers=5),
    "hf_gpt2": lambda: hf_model("gpt2", num_layers=5),
    "index_scaled": lambda: IndexScaled(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_replicated_capture_equals_full_export(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    fast = capture(model, seq_len=32, replicate_layers=True)
    full = capture(model, seq_len=32, replicate_layers=False)
    assert len(fast.gm.graph.nodes) == len(full.gm.graph.nodes)
    assert [n.target for n in fast.gm.graph.nodes if n.op == "call_function"] == \
           [n.target for n in full.gm.graph.nodes if n.op == "call_function"]
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    params = list(model.parameters())
    lf, lr = fast.gm(ids, labels), full.gm(ids, labels)
    lf = lf[0] if isinstance(lf, tuple) else lf
    lr = lr[0] if isinstance(lr, tuple) else lr
    assert torch.equal(lf, lr)
    for a, b in zip(torch.autograd.grad(lf, params), torch.autograd.grad(lr, params), strict=True):
        assert torch.equal(a, b)
    # every parameter the graph reads is the user's own object
    mine = {id(p) for p in model.parameters()}
    assert all(id(p) in mine for _, p in fast.gm.named_parameters())


def test_uniform_layers_are_found_and_mixed_layer_types_are_not():
    assert find_uniform_layers(Llama(LlamaConfig(num_layers=6)))[0] == "layers"
    assert find_uniform_layers(Llama(LlamaConfig(num_layers=3))) is None  # too shallow to gain
    qwen = hf_model("qwen2", num_layers=5)
    qwen.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * 2
    assert find_uniform_layers(qwen) is None


# --- layers that differ in Python behaviour: replication must prove uniformity or fall back ------
def _program_matches_model(model, loss_fn, program):
    """The compiled segment chain's float64 loss and every parameter gradient equal the model's."""
    inputs = batch(2, 32, seed=5)
    params = dict(model.named_parameters())
    ref_loss, ref_grads = loss_and_grads(model, loss_fn, params, inputs)
    loss = run_chain(program.segments, inputs)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    assert rel_err(loss, ref_loss) <= 1e-12, (loss.item(), ref_loss.item())
    err, where = max_grad_err(grads, ref_grads)
    assert err <= 1e-12, f"grad of {where}: relative error {err:.3g}"


NON_UNIFORM = {
    # name: (builder, loss_fn, words the reason must contain)
    "smollm3": (lambda: smollm3(), hf_loss, "block 3's model.model.layers.3.self_attn.use_rope = 0 differs from "
                                            "block 2's 1"),
    "nope_flag": (lambda: nope_llama("flag"), None, "block 3's layers.3.use_rope = False differs from block 2's True"),
    "nope_index": (lambda: nope_llama("index"), None, "block 3 of layers runs other ops than block 2 (its state "
                                                      "differs only in ['layers.*.layer_idx'], which its forward "
                                                      "reads)"),
    "nope_caller": (lambda: nope_llama("caller"), None, "block 3 of layers is called with other arguments than "
                                                        "block 2"),
}


@pytest.mark.parametrize("name", list(NON_UNIFORM))
def test_layers_differing_in_python_are_exported_in_full(name):
    build, loss_fn, reason = NON_UNIFORM[name]
    model = build()
    program = compile_program(model, pp_size=2, seq_len=32, loss_fn=loss_fn)
    info = program.captured.layer_replication
    assert info["replicated"] is False and info["reason"] == reason, info
    assert program.layers.num_layers == 4
    _program_matches_model(model, loss_fn, program)


UNIFORM = {
    "smollm3_rope_everywhere": (lambda: smollm3(no_rope_layers=[1, 1, 1, 1]), hf_loss, "model.model.layers"),
    "nope_flag_uniform": (lambda: nope_llama("flag", every=None), None, "layers"),
    "nope_index_uniform": (lambda: nope_llama("index", every=None), None, "layers"),
    "nope_caller_uniform": (lambda: nope_llama("caller", every=None), None, "layers"),
    "llama": (lambda: Llama(LlamaConfig(num_layers=4)).double(), None, "layers"),
}


@pytest.mark.parametrize("name", list(UNIFORM))
def test_uniform_layers_are_still_replicated_and_exact(name):
    build, loss_fn, prefix = UNIFORM[name]
    torch.manual_seed(0)
    model = build()
    program = compile_program(model, pp_size=2, seq_len=32, loss_fn=loss_fn)
    info = program.captured.layer_replication
    assert info == {"replicated": True, "reason": "every block proven to run as block 2", "prefix": prefix,
                    "num_layers": 4, "traced_layers": 3}
    _program_matches_model(model, loss_fn, program)


def test_meta_model_is_replicated():
    """The 7B benchmark's path: a model on meta tensors is proven uniform and replicated."""
    with torch.device("meta"):
        model = Llama(LlamaConfig(num_layers=6, hidden=128, heads=4, kv_heads=2, ffn=256))
    cap = capture(model, seq_len=64)
    assert cap.layer_replication["replicated"] is True
    assert all(p.device.type == "meta" for p in model.parameters())


def test_modules_held_outside_submodules_compare_by_their_state():
    """transformers >= 5.2x keeps a per-layer dict of stateless kernel modules
    (``self_attn._kernel_funcs``): one instance per layer, equal by state, not by identity."""
    from helix_compiler.capture.uniform import compare_states

    class Kernel(torch.nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.__dict__["_kernel_funcs"] = {"rope": Kernel(1.0)}  # not a registered submodule

    layers = torch.nn.ModuleList(Block() for _ in range(4))
    assert compare_states(layers, "layers")[0] is None
    layers[3].__dict__["_kernel_funcs"]["rope"].scale = 2.0
    reason = compare_states(layers, "layers")[0]
    assert reason is not None and reason.startswith("block 3's layers.3._kernel_funcs"), reason
