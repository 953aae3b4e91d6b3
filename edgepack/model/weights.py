"""Weight loading: a Hugging Face folder's safetensors mapped onto the reference decoder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgepack.errors import EdgepackError
from edgepack.model.decoder import Decoder, DecoderConfig, rope_inv_freq
from edgepack.model.families import family_for, hf_to_decoder_names


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's *.safetensors files, by Hugging Face name."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EdgepackError(f"{folder}: no *.safetensors weights; save the model with safe_serialization=True")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise EdgepackError(f"{file}: corrupt safetensors file ({exc}); re-save or re-download it") from None
    return weights


def load_decoder(folder: str | Path, context_length: int | None = None, dtype=torch.float32) -> Decoder:
    """The reference decoder with a folder's weights, cache capacity context_length (default: the model's)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    cfg = DecoderConfig.from_hf(config, context_length)
    names = hf_to_decoder_names(family_for(config, str(folder / "config.json")), cfg.num_layers)
    weights = read_hf_weights(folder)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        names.pop("lm_head.weight")
    missing = sorted(set(names) - set(weights))
    unexpected = sorted(set(weights) - set(names))
    if missing or unexpected:
        raise EdgepackError(
            f"{folder}: weights do not match a {cfg.family} model of this config "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}); check config.json against the weights"
        )
    with torch.device("meta"):
        model = Decoder(cfg)
    state = {names[hf]: tensor for hf, tensor in weights.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    # Buffers were built on the meta device with the module; make them real.
    model.inv_freq = rope_inv_freq(cfg)
    model.k_cache = torch.zeros(model.cache_shape())
    model.v_cache = torch.zeros(model.cache_shape())
    return model.to(dtype).eval()
