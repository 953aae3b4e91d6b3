"""The decoder, once: embedding, RMSNorm, rotary attention (GQA, q/k norm, sliding windows), GLU MLP, head.

Every family's math lives here, switched by DecoderConfig facts, never by family name. How the KV cache is held
is a small strategy (cache.py) the caller hands to `Decoder.hidden`: tensors in and out (the reference, here),
a read-only cache plus this step's keys out (TFLite), state buffers written in place (Core ML). No vmap and no
branching on tensor values, so Core ML and TFLite can trace it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edgepack.model.cache import TensorCache
from edgepack.model.config import DecoderConfig
from edgepack.model.rope import inv_freq

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """x / rms(x) · w. fp16_safe (set by the Core ML adapter): the same math scaled by max|x| first, because a
    residual stream whose squares pass fp16's 65504 (the default model has one) returns zeros on an fp16 path:
    with s = max|x| per row and y = x / s, x / rms(x) = y / sqrt(mean(y²) + eps / s²), eps / s² as (√eps / s)²."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fp16_safe = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16_safe:
            s = x.abs().amax(-1, keepdim=True).clamp(min=1e-4)
            y = x / s
            return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + (self.eps**0.5 / s).pow(2)))
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in rotate-half layout on the first cos.shape[-1] dims of each head (partial rotary)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), -1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), -1)


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

    def forward(self, x, cos, sin, cache, layer: int):
        cfg = self.cfg
        steps = x.shape[1]
        q = self.q(x).view(1, steps, cfg.num_heads, cfg.head_dim)
        k = self.k(x).view(1, steps, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(x).view(1, steps, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)  # [1, heads, T, D]
        return self.o(cache.attend(layer, q, k, v, cfg.window(layer), cfg.attn_scale))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm attention and MLP, each added to the residual; Gemma 3 also normalizes each one's output."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if cfg.sandwich_norms:
            self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer: int):
        attn = self.attn(self.attn_norm(x), cos, sin, cache, layer)
        x = x + (self.post_attn_norm(attn) if hasattr(self, "post_attn_norm") else attn)
        mlp = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(mlp) if hasattr(self, "post_mlp_norm") else mlp)


class Decoder(nn.Module):
    """forward(input_ids [1, T], positions [T]) -> logits [1, T, vocab], the cache in buffers or passed in."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_buffers()

    def init_buffers(self) -> None:
        """Rotary frequencies (global, and local where sliding layers have their own base) and the cache."""
        cfg = self.cfg
        self.inv_freq, self.rope_factor = inv_freq(cfg)
        self.local_inv_freq = inv_freq(cfg, local=True)[0] if cfg.rope_local_theta is not None else None
        self.k_cache = torch.zeros(self.cache_shape())
        self.v_cache = torch.zeros(self.cache_shape())

    def cache_shape(self) -> tuple[int, ...]:
        """[layers, batch 1, KV heads, capacity, head dim]."""
        cfg = self.cfg
        return (cfg.num_layers, 1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def rotary(self, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim] at the given positions (float), LongRoPE's attention factor applied."""
        freqs = positions.float()[:, None] * (self.local_inv_freq if local else self.inv_freq)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        factor = 1.0 if local else self.rope_factor
        return angles.cos() * factor, angles.sin() * factor

    def embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def blocks(self, x: torch.Tensor, positions: torch.Tensor, cache, layers: range | None = None) -> torch.Tensor:
        """x [1, T, hidden] through the transformer layers: all, or a slice of them (a Core ML chunk runs one)."""
        ropes = {False: self.rotary(positions)}
        if self.local_inv_freq is not None:
            ropes[True] = self.rotary(positions, local=True)
        for i in range(self.cfg.num_layers) if layers is None else layers:
            cos, sin = ropes[self.cfg.local_rope(i)]
            x = self.layers[i](x, cos, sin, cache, i)
        return x

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The final-normed hidden states [1, T, hidden]; the cache strategy stores keys and runs attention."""
        return self.norm(self.blocks(self.embedding(input_ids), positions, cache))

    def forward(self, input_ids, positions, k_cache=None, v_cache=None):
        """With k_cache/v_cache given, returns (logits, k_cache, v_cache) and leaves the buffers alone."""
        inplace = k_cache is None
        cache = TensorCache(self.k_cache if inplace else k_cache, self.v_cache if inplace else v_cache, positions,
                            inplace)
        logits = self.lm_head(self.hidden(input_ids, positions, cache))
        if inplace:
            return logits
        return logits, torch.stack(cache.keys), torch.stack(cache.values)
