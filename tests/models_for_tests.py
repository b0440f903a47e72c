"""Shared builders and checks for the front-half tests (capture, passes, segments, costs).

Every model is built in code, in float64, from a fixed seed. Hugging Face models are tiny
configs (no downloads). For float64 comparisons a Hugging Face model is compiled with a
float64 ``loss_fn`` (``hf_loss``): the models' own loss upcasts the logits with
``.float()``, which is float32, not float64.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sympy  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helix_compiler import compile_program  # noqa: E402
from helix_compiler.capture.adapters import adapt_model  # noqa: E402
from helix_compiler.ir.segment import B, S  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, hf_model  # noqa: E402

HELIX_ATTENTION = torch.ops.helix.attention.default
VOCAB = 256
HIDDEN = 64
HEADS = 4
KV_HEADS = 2  # Llama-style models (GQA); GPT-style models have HEADS K/V heads
NUM_LAYERS = 2

OWN_MODELS = ("gpt", "gpt_explicit", "llama")
HF_MODELS = tuple(f"hf_{arch}_{impl}" for arch in ("llama", "gpt2", "qwen2") for impl in ("sdpa", "eager"))
ALL_MODELS = OWN_MODELS + HF_MODELS


def hf_loss(logits, labels):
    """Float64 next-token loss on the logits (the HF model's own loss is float32)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def kv_heads_of(name: str) -> int:
    return HEADS if ("gpt" in name) else KV_HEADS


def _build(name: str, seed: int, num_layers: int, max_seq_len: int):
    torch.manual_seed(seed)
    if name == "gpt":
        return GPT(GPTConfig(vocab_size=VOCAB, max_seq_len=max_seq_len, num_layers=num_layers, hidden=HIDDEN,
                             heads=HEADS))
    if name == "gpt_explicit":
        return GPT(GPTConfig(vocab_size=VOCAB, max_seq_len=max_seq_len, num_layers=num_layers, hidden=HIDDEN,
                             heads=HEADS, sdpa=False))
    if name == "llama":
        return Llama(LlamaConfig(vocab_size=VOCAB, num_layers=num_layers, hidden=HIDDEN, heads=HEADS,
                                 kv_heads=KV_HEADS))
    if name.startswith("hf_"):
        _, arch, impl = name.split("_")
        return hf_model(arch, num_layers=num_layers, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS,
                        vocab_size=VOCAB, max_seq_len=max_seq_len, attn_implementation=impl)
    raise ValueError(name)


def build(name: str, *, seed: int = 0, num_layers: int = NUM_LAYERS, max_seq_len: int = 8192):
    """``(model, loss_fn)``: a float64 model and the loss_fn to compile it with (None: own loss)."""
    model = _build(name, seed, num_layers, max_seq_len).double()
    return model, (hf_loss if name.startswith("hf_") else None)


def float64_reference(name: str, model):
    """The module whose float64 loss/grads the compiled graph must reproduce.

    Hugging Face's eager Llama/Qwen2 attention computes its softmax in float32
    (``softmax(..., dtype=torch.float32).to(query.dtype)``), so in float64 the unmodified
    model is only float32-accurate there. ``helix::attention`` computes in the input dtype,
    so the reference for those two is the same weights under ``attn_implementation="sdpa"``
    (float64 end to end). Every other model is its own reference.
    """
    if name in ("hf_llama_eager", "hf_qwen2_eager"):
        twin, _ = build(name.replace("eager", "sdpa"), num_layers=model.config.num_hidden_layers,
                        max_seq_len=model.config.max_position_embeddings)
        twin.load_state_dict(model.state_dict())
        return twin
    return model


@functools.cache
def compiled(name: str, seq_len: int = 32, *, micro_batch_size: int = 1, recompute: str = "without_attention",
             pp_size: int = 2, num_layers: int = NUM_LAYERS):
    """``(model, loss_fn, program)``, cached: tests only read the program and use
    ``torch.autograd.grad`` (no ``.grad`` accumulation), so sharing is safe."""
    model, loss_fn = build(name, num_layers=num_layers)
    program = compile_program(model, pp_size=pp_size, seq_len=seq_len, micro_batch_size=micro_batch_size,
                              recompute=recompute, loss_fn=loss_fn)
    return model, loss_fn, program


def batch(b: int = 2, s: int = 32, *, seed: int = 1, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (b, s), generator=gen),
            "labels": torch.randint(0, vocab, (b, s), generator=gen)}


def loss_and_grads(module, loss_fn, params: dict[str, torch.nn.Parameter], inputs):
    """Loss of ``module`` (adapted like capture adapts it) and d loss / d every parameter."""
    loss = adapt_model(module, loss_fn=loss_fn)(inputs["input_ids"], inputs["labels"])
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), dict(zip(params, grads, strict=True))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.detach().abs().max().item()
    diff = (a.detach() - b.detach()).abs().max().item()
    return diff if scale == 0 else diff / scale


def max_grad_err(grads: dict, ref: dict) -> tuple[float, str]:
    assert grads.keys() == ref.keys()
    worst, where = 0.0, ""
    for k, g in grads.items():
        assert g is not None, f"no gradient for {k}"
        assert ref[k] is not None, f"no reference gradient for {k}"
        e = rel_err(g, ref[k])
        if e >= worst:
            worst, where = e, k
    return worst, where


def expr_has_seq(x, to_expr) -> bool:
    return S in sympy.sympify(to_expr(x)).free_symbols


def seq_dims(val, to_expr) -> int:
    """How many dims of a tensor value are (multiples of) the sequence length."""
    return sum(expr_has_seq(d, to_expr) for d in val.shape)


def tensor_vals(node):
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def at(expr, b: int, s: int) -> int:
    """A cost expression at concrete sizes, as an exact integer."""
    v = sympy.sympify(expr).subs({B: b, S: s})
    assert v.is_Integer, f"{expr} at b={b}, s={s} is {v}, not an integer"
    return int(v)


def concrete_shape(shape, b: int, s: int) -> list[int]:
    return [at(d, b, s) for d in shape]


def segment_args(seg, b: int, s: int, *, seed: int = 0, requires_grad: bool = True):
    """Random chain inputs (from ``seg.input_meta``) that require grad as the chain's do
    (floating values), plus the user inputs the segment reads."""
    gen = torch.Generator().manual_seed(seed)
    chain = []
    for shape, dtype in seg.input_meta:
        shp = concrete_shape(shape, b, s)
        if dtype.is_floating_point:
            t = torch.randn(shp, dtype=dtype, generator=gen).requires_grad_(requires_grad)
        else:
            t = torch.randint(0, VOCAB, shp, generator=gen)
        chain.append(t)
    user = batch(b, s, seed=seed + 1)
    return chain, [user[n] for n in seg.user_inputs]


# --- models the compiler must reject ------------------------------------------------------------
class MaskedGPT(GPT):
    """GPT whose attention takes a mask from ``mask_fn(input_ids, t) -> bool [.., t, t]`` (True =
    attend), through SDPA's ``attn_mask`` or, with ``explicit=True``, through
    ``masked_fill(~mask, -inf)`` before an explicit softmax."""

    def __init__(self, cfg: GPTConfig, mask_fn, *, explicit: bool = False):
        super().__init__(cfg)
        self.mask_fn, self.explicit = mask_fn, explicit

    def forward(self, input_ids, labels):
        b, t = input_ids.shape
        x = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))
        keep = self.mask_fn(input_ids, t)
        for blk in self.h:
            c = x.shape[-1]
            q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(c, dim=2)
            q, k, v = (y.view(b, t, blk.attn.heads, c // blk.attn.heads).transpose(1, 2) for y in (q, k, v))
            if self.explicit:
                att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
                y = att.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            x = x + blk.attn.c_proj(y.transpose(1, 2).reshape(b, t, c))
            x = x + blk.c_proj(F.gelu(blk.c_fc(blk.ln_2(x)), approximate="tanh"))
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def padding_mask(input_ids, t):
    """Causal AND "token is not padding (id 0)": depends on the input data."""
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    return (input_ids != 0)[:, None, None, :] & causal


def sliding_window_mask(input_ids, t, window: int = 4):
    """Shape-only but not causal: each token sees the previous ``window`` tokens only."""
    i = torch.arange(t, device=input_ids.device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


def bidirectional_mask(input_ids, t):
    """Shape-only, all True: full (non-causal) attention spelled as a mask."""
    return torch.ones(t, t, dtype=torch.bool, device=input_ids.device)


def masked_gpt(mask_fn, *, explicit: bool = False, num_layers: int = NUM_LAYERS):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, max_seq_len=1024, num_layers=num_layers, hidden=HIDDEN, heads=HEADS)
    return MaskedGPT(cfg, mask_fn, explicit=explicit).double()



# --- models whose layers differ in Python behaviour (layer replication must notice) --------------
from helix_compiler.models import LlamaBlock, _rotate_half  # noqa: E402


class NoPELlamaBlock(LlamaBlock):
    """A Llama block that skips RoPE when ``how="flag"`` and its ``use_rope`` is False, when
    ``how="index"`` and ``(layer_idx + 1) % every == 0`` (read in forward), or when its caller
    passes ``cos=None`` (``how="caller"``)."""

    def __init__(self, cfg: LlamaConfig, index: int, how: str, every: int | None):
        super().__init__(cfg)
        self.how, self.every, self.layer_idx = how, every, index
        if how == "flag":
            self.use_rope = every is None or (index + 1) % every != 0

    def forward(self, x, cos, sin):
        if self.how == "flag":
            rope = self.use_rope
        elif self.how == "index":
            rope = self.every is None or (self.layer_idx + 1) % self.every != 0
        else:
            rope = cos is not None
        a = self.self_attn
        h = self.input_layernorm(x)
        b, t, _ = h.shape
        q = a.q_proj(h).view(b, t, a.heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        if rope:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rep = a.heads // a.kv_heads
        k = k[:, :, None].expand(b, a.kv_heads, rep, t, a.head_dim).reshape(b, a.heads, t, a.head_dim)
        v = v[:, :, None].expand(b, a.kv_heads, rep, t, a.head_dim).reshape(b, a.heads, t, a.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class NoPELlama(Llama):
    """Llama without RoPE on every ``every``-th layer (1-based), decided by ``how`` (see
    ``NoPELlamaBlock``); ``every=None``: RoPE on every layer (a uniform model)."""

    def __init__(self, cfg: LlamaConfig, *, how: str = "flag", every: int | None = 4):
        super().__init__(cfg)
        self.how, self.every = how, every
        self.layers = torch.nn.ModuleList(NoPELlamaBlock(cfg, i, how, every) for i in range(cfg.num_layers))

    def forward(self, input_ids, labels):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.embed_tokens.weight.dtype), emb.sin().to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            skip = self.how == "caller" and self.every is not None and (i + 1) % self.every == 0
            x = layer(x, None if skip else cos, None if skip else sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def nope_llama(how: str = "flag", *, every: int | None = 4, num_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, num_layers=num_layers, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS)
    return NoPELlama(cfg, how=how, every=every).double()


def smollm3(*, num_layers: int = 4, no_rope_layers: list[int] | None = None, seed: int = 0):
    """A tiny Hugging Face SmolLM3 (float64): NoPE on every 4th layer unless ``no_rope_layers``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.SmolLM3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN + 44, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256, use_cache=False,
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layers=no_rope_layers)
    return transformers.SmolLM3ForCausalLM(cfg).double()


# --- sliding windows, soft-capping, ALiBi (tests/single/test_attention_window.py) ---------------
WINDOW_ARCHS = ("mistral", "qwen2", "gemma2")


def hf_window_model(arch: str, *, sliding_window: int = 16, attn_implementation: str = "sdpa",
                    softcap: float | None = None, seed: int = 0, num_layers: int = NUM_LAYERS):
    """A tiny float64 Hugging Face model with sliding-window attention layers.

    mistral: every layer windowed; qwen2: ``use_sliding_window=True, max_window_layers=1``
    (layer_types = [full, sliding]); gemma2: its alternating [sliding, full] layers, no final
    logit soft-capping, attention soft-capping ``softcap`` (None: off)."""
    import transformers

    common = dict(vocab_size=VOCAB, use_cache=False, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN + 44,
                  num_hidden_layers=num_layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=256, sliding_window=sliding_window,
                  attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            use_sliding_window=True, max_window_layers=1, **common))
    elif arch == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            head_dim=HIDDEN // HEADS, attn_logit_softcapping=softcap, final_logit_softcapping=None, **common))
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {WINDOW_ARCHS}")
    return model.double()


def hf_alibi_model(arch: str, *, seed: int = 0):
    """Tiny float64 ALiBi models: Bloom, or Falcon with ``alibi=True``."""
    import transformers

    torch.manual_seed(seed)
    if arch == "bloom":
        return transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=NUM_LAYERS, n_head=HEADS, use_cache=False)).double()
    if arch == "falcon":
        return transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS,
            alibi=True, new_decoder_architecture=False, multi_query=False, use_cache=False)).double()
    raise ValueError(f"unknown arch {arch!r}; use 'bloom' or 'falcon'")


def band_mask(window: int, *, hole: tuple[int, int] | None = None, size_dependent: bool = False):
    """``mask_fn`` for :func:`masked_gpt`: query i keeps keys i-window+1..i (a causal window of
    ``window`` tokens, Hugging Face's convention). ``hole=(qi, kj)`` also masks one kept entry
    (whenever the sequence is long enough to have it); ``size_dependent`` makes the window
    ``t // window`` (it moves with the sequence length)."""

    def fn(input_ids, t):
        i = torch.arange(t, device=input_ids.device)
        w = t // window if size_dependent else window
        keep = (i[:, None] >= i[None, :]) & (i[None, :] > i[:, None] - w)
        if hole is not None:
            qi, kj = hole
            keep = keep & ~((i[:, None] == qi) & (i[None, :] == kj))
        return keep

    return fn


COMPILE_STEPS = ("capture", "canonicalize_attention", "tag_layers", "cut_attention", "build_segments",
                 "segment_cost")


def forbid_compile_steps(monkeypatch, *steps):
    """Make the named compile_program steps fail the test if compile_program reaches them."""
    import helix_compiler.program as program_mod

    for step in steps:
        def boom(*args, _step=step, **kwargs):
            raise AssertionError(f"compile_program ran {_step} before rejecting the input")
        monkeypatch.setattr(program_mod, step, boom)
