"""DecoderConfig: every fact about a model that the reference decoder and the exporters read, from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.model.families import family_for


def read_config(folder: Path) -> dict:
    """A folder's config.json with the defaults transformers fills in for its model type: save_pretrained leaves out
    every value equal to its class default (Gemma 3's rope_theta 1e6, tied embeddings), so the file alone is not
    the model. Unsupported families and features fail here, before transformers is imported."""
    where = Path(folder) / "config.json"
    raw = json.loads(where.read_text())
    family_for(raw, str(where))
    from transformers import AutoConfig

    full = AutoConfig.for_model(**raw).to_dict()
    family_for(full, str(where))
    return full


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
    tie_word_embeddings: bool
    context_length: int  # KV-cache capacity in tokens
    max_position_embeddings: int
    # attention
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding
    attn_scale: float = 0.0  # 0: head_dim ** -0.5
    layer_types: tuple[str, ...] = ()  # per layer "full" or "sliding" (empty: all full)
    sliding_window: int | None = None  # a sliding layer's query sees the last `sliding_window` tokens, itself included
    # rotary
    rotary_dim: int = 0  # 0: head_dim (partial rotary rotates only the first rotary_dim of each head)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_original_context: int | None = None  # Phi-3's original_max_position_embeddings (LongRoPE)
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' own rotary base
    # block
    activation: str = "silu"  # gate activation of the GLU MLP: silu, or gelu_pytorch_tanh (GeGLU)
    embed_scale: float = 1.0  # Gemma scales embeddings by sqrt(hidden)
    sandwich_norms: bool = False  # Gemma 3: norms after attention and after the MLP too (four per block)

    def __post_init__(self):
        layers = self.layer_types or ("full",) * self.num_layers
        object.__setattr__(self, "layer_types", tuple(layers))
        object.__setattr__(self, "attn_scale", self.attn_scale or self.head_dim**-0.5)
        object.__setattr__(self, "rotary_dim", self.rotary_dim or self.head_dim)

    @classmethod
    def from_hf(cls, config: dict, context_length: int | None = None) -> DecoderConfig:
        family = family_for(config)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        max_positions = config.get("max_position_embeddings", 2048)
        return cls(
            family=family.name,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            context_length=min(context_length or max_positions, max_positions),
            max_position_embeddings=max_positions,
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            rotary_dim=int(head_dim * config.get("partial_rotary_factor", 1.0)),
            rope_theta=config.get("rope_theta", 10000.0),
            rope_scaling=config.get("rope_scaling"),
            rope_original_context=config.get("original_max_position_embeddings"),
            **family.facts(config),
        )

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def local_rope(self, layer: int) -> bool:
        """Whether a layer uses the local rotary base (Gemma 3's sliding layers)."""
        return self.rope_local_theta is not None and self.layer_types[layer] == "sliding"
