"""Rotary position embedding frequencies, written once: default, Llama 3's scaling, and Phi-3's LongRoPE.

Every target reads these: the reference decoder (and through it the TFLite and Core ML graphs) and the ONNX
writer's cos/sin caches. The formulas are transformers' (modeling_rope_utils.py), so parity is exact.
"""

from __future__ import annotations

import math

from edgepack.errors import EdgepackError

SUPPORTED = ("default", "llama3", "longrope")


def rope_type(scaling: dict | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope(config: dict, where: str = "config.json") -> None:
    """One clear error for a rope scaling edgepack does not compute (checked before anything is written)."""
    kind = rope_type(config.get("rope_scaling"))
    if kind not in SUPPORTED:
        raise EdgepackError(f"{where}: rope_scaling type '{kind}' is not supported; supported: {', '.join(SUPPORTED)}")


def inv_freq(cfg, local: bool = False):
    """(inverse frequencies [rotary_dim / 2] as a float32 torch tensor, attention factor applied to cos and sin).

    local: Gemma 3's sliding-window layers, which use rope_local_theta and no scaling.
    LongRoPE: transformers switches from the short to the long factors once a sequence passes
    original_max_position_embeddings; an export's cache holds at most context_length tokens, so the factors are
    the ones transformers uses for every sequence that fits (short when context_length ≤ the original length).
    """
    import torch

    dim = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = 1.0 / (theta**exponents)
    scaling = {} if local else (cfg.rope_scaling or {})
    kind = rope_type(scaling)
    if kind == "default":
        return base, 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > old_context / low, base / factor, base)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # longrope
    original = cfg.rope_original_context or cfg.max_position_embeddings
    factor = cfg.max_position_embeddings / original if cfg.rope_original_context else scaling.get("factor", 1.0)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = scaling["long_factor"] if cfg.context_length > original else scaling["short_factor"]
    return 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta**exponents), float(attention)
