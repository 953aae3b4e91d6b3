"""Each supported model family declared once: its config facts, its weight table (with transforms), its checks.

A family is data plus, where its math is new, a flag the shared blocks read (decoder.py). Every exporter reads
DecoderConfig (config.py) and the reference decoder's parameters, never a family name. Adding a family: a weight
table and a facts function here, an entry in FAMILIES, and the tiny test config in tests/conftest.py (README,
"Adding a model family").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from edgepack.errors import EdgepackError


@dataclass(frozen=True)
class Split:
    """A fused checkpoint tensor cut along its rows into several parameters (Phi-3's qkv_proj, gate_up_proj)."""

    names: tuple[str, ...]
    sizes: Callable  # DecoderConfig -> row count of each part

    def apply(self, tensor, cfg) -> dict:
        return dict(zip(self.names, tensor.split(list(self.sizes(cfg)), dim=0)))


@dataclass(frozen=True)
class PlusOne:
    """A norm weight stored as w where the model multiplies by (1 + w) (Gemma's RMSNorm)."""

    name: str

    def apply(self, tensor, cfg) -> dict:
        return {self.name: tensor.float() + 1.0}


Rule = str | Split | PlusOne  # a plain string is a rename

# Hugging Face weight name -> reference-decoder parameter, shared by the llama-like families ({i} = layer).
LLAMA_WEIGHTS: dict[str, Rule] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down.weight",
}
QKV_BIAS = {f"model.layers.{{i}}.self_attn.{p}_proj.bias": f"layers.{{i}}.attn.{p}.bias" for p in "qkv"}
QK_NORM = {f"model.layers.{{i}}.self_attn.{p}_norm.weight": f"layers.{{i}}.attn.{p}_norm.weight" for p in "qk"}

_FUSED_IN_PHI3 = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
PHI3_WEIGHTS: dict[str, Rule] = {
    **{k: v for k, v in LLAMA_WEIGHTS.items() if not k.endswith(_FUSED_IN_PHI3)},
    "model.layers.{i}.self_attn.qkv_proj.weight": Split(
        ("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight", "layers.{i}.attn.v.weight"),
        lambda c: (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)),
    "model.layers.{i}.mlp.gate_up_proj.weight": Split(
        ("layers.{i}.mlp.gate.weight", "layers.{i}.mlp.up.weight"),
        lambda c: (c.intermediate_size, c.intermediate_size)),
}

# Gemma 3: four norms per block, all (1 + w); "post_attention_layernorm" normalizes the attention's output.
GEMMA3_WEIGHTS: dict[str, Rule] = {
    **LLAMA_WEIGHTS,
    "model.norm.weight": PlusOne("norm.weight"),
    "model.layers.{i}.input_layernorm.weight": PlusOne("layers.{i}.attn_norm.weight"),
    "model.layers.{i}.post_attention_layernorm.weight": PlusOne("layers.{i}.post_attn_norm.weight"),
    "model.layers.{i}.pre_feedforward_layernorm.weight": PlusOne("layers.{i}.mlp_norm.weight"),
    "model.layers.{i}.post_feedforward_layernorm.weight": PlusOne("layers.{i}.post_mlp_norm.weight"),
    **{k: PlusOne(v) for k, v in QK_NORM.items()},
}


def _plain(config: dict) -> dict:
    return {}


def _phi3(config: dict) -> dict:
    """Phi-3 / 3.5 / Phi-4-mini: partial rotary (generic), longrope (rope.py), every layer windowed if set."""
    window = config.get("sliding_window")
    return {"sliding_window": window, "layer_types": ("sliding" if window else "full",) * config["num_hidden_layers"]}


def _gemma3(config: dict) -> dict:
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % config.get("sliding_window_pattern", 6) else "full_attention"
        for i in range(layers)]
    return {
        "layer_types": tuple("sliding" if t == "sliding_attention" else "full" for t in types),
        "sliding_window": config["sliding_window"],
        "rope_local_theta": config.get("rope_local_base_freq", 10000.0),
        "attn_scale": config.get("query_pre_attn_scalar", 256) ** -0.5,
        "activation": config.get("hidden_activation") or "gelu_pytorch_tanh",
        "embed_scale": config["hidden_size"] ** 0.5,
        "sandwich_norms": True,
    }


@dataclass(frozen=True)
class Family:
    """What one architecture family is, as the reference decoder and every exporter need to know it."""

    name: str  # Hugging Face model_type
    architectures: tuple[str, ...]
    gguf_arch: str  # llama.cpp's architecture name (general.architecture)
    weight_names: dict[str, Rule]
    facts: Callable[[dict], dict] = _plain  # config.json -> DecoderConfig fields that differ from the defaults
    qkv_bias: bool = False
    qk_norm: bool = False
    # config keys whose presence (a truthy value) means a feature edgepack does not implement for this family
    unsupported: tuple[str, ...] = field(default=("mlp_bias",))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("LlamaForCausalLM",), "llama", LLAMA_WEIGHTS, unsupported=("mlp_bias", "attention_bias")),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", {**LLAMA_WEIGHTS, **QKV_BIAS}, qkv_bias=True,
           unsupported=("use_sliding_window",)),
    Family("qwen3", ("Qwen3ForCausalLM",), "qwen3", {**LLAMA_WEIGHTS, **QK_NORM}, qk_norm=True,
           unsupported=("use_sliding_window", "attention_bias")),
    Family("phi3", ("Phi3ForCausalLM",), "phi3", PHI3_WEIGHTS, _phi3),
    Family("gemma3_text", ("Gemma3ForCausalLM",), "gemma3", GEMMA3_WEIGHTS, _gemma3, qk_norm=True,
           unsupported=("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
                        "rope_scaling")),
)}
SUPPORTED_MODELS = "SmolLM2, Llama 3.x, TinyLlama, Qwen2.5, Qwen3, Phi-3/3.5-mini, Phi-4-mini, Gemma 3 270M/1B"


def family_for(config: dict, where: str = "config.json") -> Family:
    """The family of a Hugging Face config.json, or one clear error naming what was found or what is missing."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        found = model_type or ", ".join(config.get("architectures", [])) or "nothing"
        raise EdgepackError(f"{where}: unsupported architecture '{found}'; edgepack supports "
                            f"{', '.join(FAMILIES)} ({SUPPORTED_MODELS})")
    family = FAMILIES[model_type]
    for key in family.unsupported:
        if config.get(key):
            raise EdgepackError(f"{where}: {model_type} with {key} = {config[key]!r} is not supported; "
                                "edgepack would compute a different model, so nothing was written")
    from edgepack.model.rope import check_rope

    check_rope(config, where)
    return family


def expand(family: Family, num_layers: int) -> dict[str, Rule]:
    """The weight table for a model with num_layers layers: {i} replaced in both the HF name and the rule."""
    def at(rule: Rule, i: int) -> Rule:
        if isinstance(rule, str):
            return rule.format(i=i)
        if isinstance(rule, Split):
            return Split(tuple(n.format(i=i) for n in rule.names), rule.sizes)
        return PlusOne(rule.name.format(i=i))

    table: dict[str, Rule] = {}
    for hf, rule in family.weight_names.items():
        for i in range(num_layers) if "{i}" in hf else (0,):
            table[hf.format(i=i)] = at(rule, i)
    return table
