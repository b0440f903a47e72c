"""Small reference transformers built in code (no downloads): the shapes users bring.

``GPT``: nanoGPT-style GPT-2 (learned positions, LayerNorm, GeLU MLP with biases, tied
embedding/head). ``Llama``: RoPE, RMSNorm, SwiGLU, GQA, untied head. Both take
``(input_ids, labels, position_ids=None, document_ids=None)`` and return the mean
cross-entropy loss, written the way users write them (plain ``nn.Module``s, SDPA or explicit
softmax attention). Packed documents: ``position_ids`` restart per document (RoPE / learned
positions) and ``document_ids`` (one id per token) give a block-diagonal causal mask. ``hf_model`` builds tiny
Hugging Face ``transformers`` models from configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    max_seq_len: int = 1024
    num_layers: int = 4
    hidden: int = 64
    heads: int = 4
    sdpa: bool = True  # False: explicit matmul -> scale -> mask -> softmax -> matmul


class GPTAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.c_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.heads, self.sdpa = cfg.heads, cfg.sdpa

    def forward(self, x, keep=None):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        if self.sdpa:
            y = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if keep is None
                 else F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() if keep is None else keep
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = att @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = GPTAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.c_fc = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.c_proj = nn.Linear(4 * cfg.hidden, cfg.hidden)

    def forward(self, x, keep=None):
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden)
        self.h = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)

    def forward(self, input_ids, labels, position_ids=None, document_ids=None):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device) if position_ids is None else position_ids
        x = self.wte(input_ids) + self.wpe(pos)
        keep = document_mask(document_ids)
        for block in self.h:
            x = block(x, keep)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def document_mask(document_ids):
    """``[b, 1, t, t]`` bool keep-mask: causal within each document (``None`` -> plain causal)."""
    if document_ids is None:
        return None
    t = document_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    return causal & (document_ids[:, None, :, None] == document_ids[:, None, None, :])


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    num_layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 172
    rope_theta: float = 10000.0
    eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:  # what a meta-built model runs on materialization
        nn.init.ones_(self.weight)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.hidden // cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, keep=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads  # GQA through repeat_kv, as Llama code does
        k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        y = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if keep is None
             else F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, keep=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, keep)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        head_dim = self.cfg.hidden // self.cfg.heads
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))

    def reset_parameters(self) -> None:
        # the rotary cache is not in checkpoints (non-persistent): a meta-built model recomputes it
        with torch.no_grad():
            self.inv_freq.copy_(self._inv_freq(self.inv_freq.device))

    def forward(self, input_ids, labels, position_ids=None, document_ids=None):
        t = input_ids.shape[1]
        if position_ids is None:
            pos = torch.arange(t, device=input_ids.device, dtype=self.inv_freq.dtype)
            freqs = torch.outer(pos, self.inv_freq)  # [t, d/2]
        else:  # per-row positions: [b, 1, t, d/2], broadcast over heads
            freqs = (position_ids.to(self.inv_freq.dtype)[..., None] * self.inv_freq)[:, None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.embed_tokens.weight.dtype), emb.sin().to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(input_ids)
        keep = document_mask(document_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, keep)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def hf_model(arch: str, *, num_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
             vocab_size: int = 256, max_seq_len: int = 256, attn_implementation: str = "sdpa"):
    """A tiny randomly initialised ``transformers`` causal LM ("llama", "gpt2" or "qwen2")."""
    import transformers

    common = dict(vocab_size=vocab_size, use_cache=False, attn_implementation=attn_implementation)
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 44,
                                       num_hidden_layers=num_layers, num_attention_heads=heads,
                                       num_key_value_heads=kv_heads, max_position_embeddings=max_seq_len, **common)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden + 44,
                                       num_hidden_layers=num_layers, num_attention_heads=heads,
                                       num_key_value_heads=kv_heads, max_position_embeddings=max_seq_len, **common)
        return transformers.Qwen2ForCausalLM(cfg)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=max_seq_len,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return transformers.GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown arch {arch!r}; use 'llama', 'qwen2' or 'gpt2'")
