"""Capturing a deep model from three exported blocks equals exporting every block."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.capture.replicate import find_uniform_layers  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, hf_model  # noqa: E402


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
