"""chunk_mlp on exported GPT-style (GeLU MLP with biases) and Llama-style (SwiGLU) blocks.

Numerics in float64 against the unmodified exported graph. Outputs and input gradients are
computed row by row with the same ops, so they are bitwise equal whenever the GEMM library
uses the same kernel for the chunk's row count as for the whole input: asserted for
num_chunks=1; for smaller chunks BLAS may switch kernels (seen on this machine's MKL for
2-row chunks), so those are checked at rtol=atol=1e-12. Parameter gradients are sums of
per-chunk partial sums (reassociation): rtol 1e-12 in float64, 1e-5 in float32.
Exports are slow (~2.5 s each): they are cached and deep-copied.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from interp_child import run_interp_tests_in_child
from torch.utils._python_dispatch import TorchDispatchMode

from helix_compiler.errors import HelixError
from helix_compiler.kernels.triton_attention import interpreting
from helix_compiler.passes.mlp_chunk import (
    MLP_CHUNK,
    chunk_mlp,
    chunked_gelu_mlp,
    chunked_swiglu_mlp,
    find_mlp_regions,
)

aten = torch.ops.aten
H, HEADS, KV_HEADS, FFN_GPT, FFN_LLAMA = 16, 4, 2, 64, 40
SEQ, BATCH = 11, 2


# --- models ------------------------------------------------------------------------------------------
class GPTBlock(nn.Module):
    """nanoGPT block: LN, causal self-attention, LN, GeLU MLP (biases, exact or tanh GeLU)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.c_attn, self.c_proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.c_fc, self.mlp_proj = nn.Linear(H, FFN_GPT), nn.Linear(FFN_GPT, H)
        self.approximate = approximate

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(H, dim=2)
        q, k, v = (t.view(b, s, HEADS, H // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, s, H))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=self.approximate))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LlamaBlock(nn.Module):
    """Llama block: RMSNorm, GQA attention (no biases), RMSNorm, SwiGLU MLP (no biases)."""

    def __init__(self, up_first: bool = False):
        super().__init__()
        d = H // HEADS
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
        self.q_proj = nn.Linear(H, HEADS * d, bias=False)
        self.k_proj = nn.Linear(H, KV_HEADS * d, bias=False)
        self.v_proj = nn.Linear(H, KV_HEADS * d, bias=False)
        self.o_proj = nn.Linear(H, H, bias=False)
        self.gate_proj = nn.Linear(H, FFN_LLAMA, bias=False)
        self.up_proj = nn.Linear(H, FFN_LLAMA, bias=False)
        self.down_proj = nn.Linear(FFN_LLAMA, H, bias=False)
        self.up_first = up_first

    def forward(self, x):
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, HEADS, -1).transpose(1, 2)
        k = self.k_proj(h).view(b, s, KV_HEADS, -1).transpose(1, 2)
        v = self.v_proj(h).view(b, s, KV_HEADS, -1).transpose(1, 2)
        g = HEADS // KV_HEADS
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, s, H))
        h = self.post_attention_layernorm(x)
        if self.up_first:
            return x + self.down_proj(self.up_proj(h) * F.silu(self.gate_proj(h)))
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def export(model: nn.Module, x: torch.Tensor, dynamic: bool = True) -> torch.fx.GraphModule:
    ds = {"x": {1: torch.export.Dim("seq", min=2, max=4096)}} if dynamic else None
    return torch.export.export(model, (x,), dynamic_shapes=ds, strict=False).module()


_EXPORTS: dict = {}


def exported(kind: str, dtype=torch.float64):
    """(fresh copy of the exported graph, input) for a 2-layer stack: "gpt" = exact-GeLU
    layer + tanh-GeLU layer; "llama" = silu(gate)*up layer + up*silu(gate) layer."""
    key = (kind, dtype)
    if key not in _EXPORTS:
        torch.manual_seed(0)
        if kind == "gpt":
            model = Stack(GPTBlock("none"), GPTBlock("tanh"))
        else:
            model = Stack(LlamaBlock(up_first=False), LlamaBlock(up_first=True))
        model = model.to(dtype)
        x = torch.randn(BATCH, SEQ, H, dtype=dtype)
        _EXPORTS[key] = (export(model, x), x)
    gm, x = _EXPORTS[key]
    return copy.deepcopy(gm), x


def run(gm, x, dy):
    for p in gm.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    y = gm(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in gm.named_parameters()}


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def assert_same(ref_gm, new_gm, x, *, param_rtol=1e-12, bitwise=False, seed=1):
    dy = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    y0, dx0, g0 = run(ref_gm, x, dy)
    y1, dx1, g1 = run(new_gm, x, dy)
    tol = dict(rtol=0, atol=0) if bitwise else dict(rtol=param_rtol, atol=param_rtol)
    torch.testing.assert_close(y1, y0, **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(dx1, dx0, **tol, msg=lambda m: f"input grad: {m}")
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=param_rtol, atol=param_rtol * 10,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


# --- numerics + structure -----------------------------------------------------------------------------
@pytest.mark.parametrize("num_chunks", [1, 2, 3, 11])  # 3 does not divide SEQ=11; 11 = 1 token each
@pytest.mark.parametrize("recompute", [True, False])
def test_gpt_blocks(num_chunks, recompute):
    ref, x = exported("gpt")
    gm, _ = exported("gpt")
    assert count(gm, aten.gelu.default) == 2
    res = chunk_mlp(gm, num_chunks=num_chunks, recompute=recompute)
    gm.graph.lint()
    assert res.changed and len(res.info["regions"]) == 2
    assert count(gm, aten.gelu.default) == 0
    assert count(gm, aten.linear.default) == count(ref, aten.linear.default) - 4
    assert count(gm, chunked_gelu_mlp) == 2
    nodes = [n for n in gm.graph.nodes if n.target is chunked_gelu_mlp]
    assert [n.kwargs["approximate"] for n in nodes] == ["none", "tanh"]
    for node in nodes:
        assert node.meta[MLP_CHUNK]["seq_dim"] == 1 and node.kwargs["num_chunks"] == num_chunks
        assert node.kwargs["recompute"] == recompute
        assert node.meta["val"].shape[-1] == H and "nn_module_stack" in node.meta
        assert all(a is not None for a in node.args)  # both biases
    assert_same(ref, gm, x, bitwise=num_chunks == 1)
    # another sequence length through the same graph (dynamic seq dim)
    assert_same(ref, gm, torch.randn(BATCH, 13, H, dtype=torch.float64))


@pytest.mark.parametrize("num_chunks", [1, 4, 11])
@pytest.mark.parametrize("recompute", [True, False])
def test_llama_blocks(num_chunks, recompute):
    ref, x = exported("llama")
    gm, _ = exported("llama")
    res = chunk_mlp(gm, num_chunks=num_chunks, recompute=recompute)
    gm.graph.lint()
    assert [r["kind"] for r in res.info["regions"]] == ["swiglu", "swiglu"]
    assert count(gm, aten.silu.default) == 0
    assert count(gm, aten.mul.Tensor) == count(ref, aten.mul.Tensor) - 2
    assert count(gm, chunked_swiglu_mlp) == 2
    assert count(gm, aten.linear.default) == count(ref, aten.linear.default) - 6
    for node in gm.graph.nodes:
        if node.target is chunked_swiglu_mlp:
            assert node.args[2] is None and node.args[4] is None and node.args[6] is None
    assert_same(ref, gm, x, bitwise=num_chunks == 1)


def test_float32_tolerance():
    ref, x = exported("llama", torch.float32)
    gm, _ = exported("llama", torch.float32)
    chunk_mlp(gm, num_chunks=4)
    assert_same(ref, gm, x, bitwise=False, param_rtol=1e-5)


# --- memory behaviour -----------------------------------------------------------------------------------
class FFNShapes(TorchDispatchMode):
    """Records the numel of every op output whose last dim is the FFN width."""

    def __init__(self, ffn):
        super().__init__()
        self.ffn, self.sizes = ffn, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.ffn:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("kind, ffn", [("gpt", FFN_GPT), ("llama", FFN_LLAMA)])
def test_recompute_keeps_ffn_tensors_chunk_sized(kind, ffn):
    seq, n = 48, 4  # chunk tensors [2, 12, ffn] are larger than any [.., ffn] weight
    ref, _ = exported(kind)
    gm, _ = exported(kind)
    chunk_mlp(gm, num_chunks=n, recompute=True)
    x = torch.randn(BATCH, seq, H, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = gm(x)
    weights = {tuple(p.shape) for p in gm.parameters()}
    acts = [s for s in saved if s[-1] == ffn and tuple(s) not in weights]
    assert saved and not acts, f"[.., ffn] activations saved for backward: {acts}"
    with FFNShapes(ffn) as mode:  # forward ran chunked; backward recomputes chunk by chunk
        y.sum().backward()
    assert mode.sizes and max(mode.sizes) == BATCH * (seq // n) * ffn
    # the unchunked graph does hold whole [b, s, ffn] tensors, and saves them
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = ref(x)
    assert [s for s in saved if tuple(s) == (BATCH, seq, ffn)]
    with FFNShapes(ffn) as mode:
        y.sum().backward()
    assert max(mode.sizes) == BATCH * seq * ffn


# --- matching rules, seq dim, errors ----------------------------------------------------------------
def test_intermediate_with_other_users_is_not_matched():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = nn.Linear(H, FFN_GPT), nn.Linear(FFN_GPT, H)

        def forward(self, x):
            h = F.gelu(self.fc(x))
            return self.proj(h), h.sum()  # h needed outside the MLP

    gm = export(Leaky().double(), torch.randn(BATCH, SEQ, H, dtype=torch.float64))
    assert find_mlp_regions(gm) == []
    with pytest.warns(UserWarning, match="no MLP region matched"):
        res = chunk_mlp(gm, num_chunks=2)
    assert not res.changed and res.info["regions"] == []


def test_seq_first_layout_and_explicit_seq_dim():
    class SeqFirstMLP(nn.Module):  # Megatron layout [s, b, h]
        def __init__(self):
            super().__init__()
            self.fc, self.proj = nn.Linear(H, FFN_GPT), nn.Linear(FFN_GPT, H)

        def forward(self, x):
            return self.proj(F.gelu(self.fc(x)))

    model = SeqFirstMLP().double()
    x = torch.randn(SEQ, BATCH, H, dtype=torch.float64)
    ds = {"x": {0: torch.export.Dim("seq", min=2, max=4096)}}
    ref = torch.export.export(model, (x,), dynamic_shapes=ds, strict=False).module()
    gm = copy.deepcopy(ref)
    res = chunk_mlp(gm, num_chunks=3)  # the symbolic dim is found
    assert res.info["regions"][0]["seq_dim"] == 0
    assert_same(ref, gm, x)
    static = torch.export.export(model, (x,), strict=False).module()
    with pytest.raises(HelixError, match=r"num_chunks=12 exceeds the sequence length \(11"):
        chunk_mlp(copy.deepcopy(static), num_chunks=12, seq_dim=0)
    res = chunk_mlp(static, num_chunks=3, seq_dim=0)
    assert res.info["regions"][0]["seq_dim"] == 0
    assert_same(ref, static, x)


def test_bad_num_chunks_and_seq_dim_raise():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(HelixError, match="num_chunks=.* must be an int >= 1"):
            chunk_mlp(exported("gpt")[0], num_chunks=bad)
    with pytest.raises(HelixError, match="num_chunks=5000 exceeds"):
        chunk_mlp(exported("gpt")[0], num_chunks=5000)  # above Dim max=4096
    with pytest.raises(HelixError, match="seq_dim=2 is not a leading dim"):
        chunk_mlp(exported("gpt")[0], num_chunks=2, seq_dim=2)
    # dynamic seq: too short an input is rejected at run time, naming the node
    gm, _ = exported("gpt")
    chunk_mlp(gm, num_chunks=8)
    with pytest.raises(HelixError, match=r"node 'linear_\d+' runs with num_chunks=8 .* only 5"):
        gm(torch.randn(BATCH, 5, H, dtype=torch.float64))
    with pytest.raises(HelixError, match="activation_backend"):
        chunk_mlp(exported("gpt")[0], num_chunks=2, activation_backend="cuda")


# --- Triton activation inside the chunks (interpreter) ---------------------------------------------
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_interp_triton_activation_in_chunks(kind):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not interpreting():
        pytest.skip("runs in the TRITON_INTERPRET=1 child (test_triton_chunks_in_child_process)")
    ref, x = exported(kind, torch.float32)
    gm, _ = exported(kind, torch.float32)
    chunk_mlp(gm, num_chunks=3, activation_backend="triton")
    assert_same(ref, gm, x, bitwise=False, param_rtol=2e-5)


def test_triton_chunks_in_child_process():
    run_interp_tests_in_child(__file__, expected_min=2)

