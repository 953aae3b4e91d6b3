"""The reference decoder: llama / qwen2 / qwen3 in plain PyTorch, with a static KV cache, readable in one sitting.

Explicit input_ids, positions and an additive causal mask; no vmap and no branching on tensor values, so
Core ML and TFLite can trace it. The cache has a fixed capacity and lives either in buffers updated in place
(Core ML state) or in tensors passed in and returned (TFLite signatures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from edgepack.errors import EdgepackError
from edgepack.model.families import family_for


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    context_length: int  # KV-cache capacity in tokens

    @classmethod
    def from_hf(cls, config: dict, context_length: int | None = None) -> DecoderConfig:
        family = family_for(config)
        heads = config["num_attention_heads"]
        max_positions = config.get("max_position_embeddings", 2048)
        return cls(
            family=family.name,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", 10000.0),
            rope_scaling=config.get("rope_scaling"),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            context_length=min(context_length or max_positions, max_positions),
        )


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3's long-context scaling when the config asks for it."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise EdgepackError(f"config.json: rope_scaling type '{kind}' is not supported; supported: default, llama3")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def causal_mask(positions: torch.Tensor, capacity: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [1, 1, T, capacity]: query t sees cache slots 0..positions[t]."""
    slots = torch.arange(capacity, dtype=positions.dtype)
    visible = slots[None, :] <= positions[:, None]
    return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, positions, k_cache, v_cache, inplace: bool):
        cfg = self.cfg
        batch, steps, _ = x.shape
        q = self.q(x).view(batch, steps, cfg.num_heads, cfg.head_dim)
        k = self.k(x).view(batch, steps, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(x).view(batch, steps, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if inplace:  # cache in buffers (Core ML state)
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
            keys, values = k_cache, v_cache
        else:  # cache in and out as tensors (TFLite signatures)
            keys, values = k_cache.index_copy(2, positions, k), v_cache.index_copy(2, positions, v)
        repeat = cfg.num_heads // cfg.num_kv_heads
        capacity = keys.shape[2]
        k_all = keys[:, :, None].expand(batch, cfg.num_kv_heads, repeat, capacity, cfg.head_dim)
        v_all = values[:, :, None].expand(batch, cfg.num_kv_heads, repeat, capacity, cfg.head_dim)
        k_all = k_all.reshape(batch, cfg.num_heads, capacity, cfg.head_dim)
        v_all = v_all.reshape(batch, cfg.num_heads, capacity, cfg.head_dim)
        scores = q @ k_all.transpose(-1, -2) * (cfg.head_dim**-0.5) + mask
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v_all
        out = out.transpose(1, 2).reshape(batch, steps, cfg.num_heads * cfg.head_dim)
        return self.o(out), keys, values


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, positions, k_cache, v_cache, inplace: bool):
        attn, keys, values = self.attn(self.attn_norm(x), cos, sin, mask, positions, k_cache, v_cache, inplace)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), keys, values


class Decoder(nn.Module):
    """forward(input_ids [1, T], positions [T], mask [1, 1, T, C]) -> logits [1, T, vocab]."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        shape = self.cache_shape()
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def cache_shape(self) -> tuple[int, ...]:
        """[layers, batch 1, KV heads, capacity, head dim]."""
        cfg = self.cfg
        return (cfg.num_layers, 1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def forward(self, input_ids, positions, mask, k_cache=None, v_cache=None):
        """With k_cache/v_cache given, returns (logits, k_cache, v_cache) and leaves the buffers alone."""
        inplace = k_cache is None
        if inplace:
            k_cache, v_cache = self.k_cache, self.v_cache
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(self.embed.weight.dtype), angles.sin().to(self.embed.weight.dtype)
        x = self.embed(input_ids)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, positions, k_cache[i], v_cache[i], inplace)
            keys.append(k)
            values.append(v)
        logits = self.lm_head(self.norm(x))
        if inplace:
            return logits
        return logits, torch.stack(keys), torch.stack(values)
