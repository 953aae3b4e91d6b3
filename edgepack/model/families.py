"""Each supported model family's facts in one place: config names, weight-name table, rotary layout."""

from __future__ import annotations

from dataclasses import dataclass

from edgepack.errors import EdgepackError

# Hugging Face weight name -> reference-decoder parameter name, shared by every family ({i} = layer).
# A family adds only what differs (biases, per-head norms). Exporters read names from here.
_COMMON = {
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
_QKV_BIAS = {
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
}
_QK_NORM = {
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
}


@dataclass(frozen=True)
class Family:
    """What one architecture family is, as the reference decoder and every exporter need to know it."""

    name: str
    architectures: tuple[str, ...]
    weight_names: dict[str, str]
    qkv_bias: bool  # Qwen2 has q/k/v biases
    qk_norm: bool  # Qwen3 normalizes each head's q and k before the rotary embedding
    rope_layout: str  # llama.cpp's name for how rotary pairs are laid out: "norm" (llama) or "neox"


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("LlamaForCausalLM",), {**_COMMON}, False, False, "norm"),
    "qwen2": Family("qwen2", ("Qwen2ForCausalLM",), {**_COMMON, **_QKV_BIAS}, True, False, "neox"),
    "qwen3": Family("qwen3", ("Qwen3ForCausalLM",), {**_COMMON, **_QK_NORM}, False, True, "neox"),
}


def family_for(config: dict, where: str = "config.json") -> Family:
    """The family of a Hugging Face config.json, or one clear error naming what was found."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        found = model_type or ", ".join(config.get("architectures", [])) or "nothing"
        raise EdgepackError(
            f"{where}: unsupported architecture '{found}'; edgepack supports {', '.join(FAMILIES)} "
            "(SmolLM2, Llama 3.x, TinyLlama, Qwen2.5, Qwen3)"
        )
    for flag in ("use_sliding_window", "mlp_bias") + (("attention_bias",) if model_type == "llama" else ()):
        if config.get(flag):
            raise EdgepackError(f"{where}: {model_type} with {flag} = true is not supported yet")
    return FAMILIES[model_type]


def hf_to_decoder_names(family: Family, num_layers: int) -> dict[str, str]:
    """The weight table expanded for a model with num_layers layers."""
    names = {}
    for hf, ours in family.weight_names.items():
        if "{i}" in hf:
            names.update({hf.format(i=i): ours.format(i=i) for i in range(num_layers)})
        else:
            names[hf] = ours
    return names
