"""Weight loading: a Hugging Face folder's safetensors mapped onto the reference decoder through the family's table."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edgepack.errors import EdgepackError
from edgepack.model.config import DecoderConfig, read_config
from edgepack.model.decoder import Decoder
from edgepack.model.families import FAMILIES, expand


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EdgepackError(f"{folder}: no *.safetensors weights; save the model with safe_serialization=True")
    return files


def iter_hf_weights(folder: Path, wanted=None, each_mapped_alone: bool = False):
    """(name, tensor) for every tensor of a folder's safetensors files, one at a time (memory-mapped); with
    wanted(name) false the tensor is not read and None stands in for it.

    A tensor is a view of the file's mapping, and every page of it read stays resident while any tensor of that
    mapping lives. each_mapped_alone: the file is opened again for each tensor, so its mapping goes with it — for
    readers that convert each tensor and drop it (a bf16 source read into fp32 otherwise holds the whole bf16 file
    beside the fp32 model: Phi-4-mini 7.7 GB more)."""
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                if not each_mapped_alone:
                    for name in names:
                        yield name, handle.get_tensor(name) if wanted is None or wanted(name) else None
                    continue
            for name in names:
                if wanted is not None and not wanted(name):
                    yield name, None
                    continue
                with safe_open(str(file), framework="pt") as handle:
                    tensor = handle.get_tensor(name)
                yield name, tensor
                del tensor
        except (SafetensorError, OSError) as exc:
            raise EdgepackError(f"{file}: corrupt safetensors file ({exc}); re-save or re-download it") from None


def _targets(rule) -> tuple[str, ...]:
    """The decoder parameters a weight-table rule writes."""
    return (rule,) if isinstance(rule, str) else getattr(rule, "names", None) or (rule.name,)


def decoder_state(folder: Path, cfg: DecoderConfig, family, keep=None, dtype=None) -> dict[str, torch.Tensor]:
    """The reference decoder's parameters from a checkpoint, through the family's weight table (renames, fused
    tensors split, (1 + w) norms); with keep(parameter name), only those (the rest are never read); with dtype,
    each converted as it is read, so that no second copy of the model is ever held (phi3's fused qkv / gate_up
    split into bf16 copies: Phi-4-mini held 4.2 GB of them beside its 15.3 GB of fp32 weights, 19.8 GB in all)."""
    table = expand(family, cfg.num_layers)
    if cfg.tie_word_embeddings:
        table.pop("lm_head.weight", None)

    def wanted(name: str) -> bool:  # a checkpoint tensor some kept parameter comes from
        return name in table and any(keep(t) for t in _targets(table[name]))

    state, seen, unexpected = {}, set(), []
    for name, tensor in iter_hf_weights(folder, None if keep is None else wanted, each_mapped_alone=dtype is not None):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        rule = table.get(name)
        if rule is None:
            unexpected.append(name)
            continue
        seen.add(name)
        if tensor is not None:
            parts = {rule: tensor} if isinstance(rule, str) else rule.apply(tensor, cfg)
            state.update({k: v if dtype is None else v.to(dtype) for k, v in parts.items() if keep is None or keep(k)})
            del parts, tensor
    missing = sorted(set(table) - seen)
    if missing or unexpected:
        raise EdgepackError(
            f"{folder}: weights do not match a {cfg.family} model of this config "
            f"(missing: {missing[:3]}, unexpected: {sorted(unexpected)[:3]}); check config.json against the weights")
    return state


def load_decoder(folder: str | Path, context_length: int | None = None, dtype=torch.float32, keep=None) -> Decoder:
    """The reference decoder with a folder's weights, cache capacity context_length (default: the model's).
    dtype None keeps the checkpoint's own (bf16: 2 bytes a parameter): for writers that read the weights one at a
    time and convert each as they go, not for running the model. keep(parameter name): load only those, the rest
    stay on the meta device (no memory), for converters that take the model a slice of layers at a time."""
    folder = Path(folder)
    cfg = DecoderConfig.from_hf(read_config(folder), context_length)
    with torch.device("meta"):
        model = Decoder(cfg)
    if keep is not None and cfg.tie_word_embeddings:  # the tied head is the embedding's tensor
        wanted = keep
        keep = lambda name: wanted(name) or (name == "embed.weight" and wanted("lm_head.weight"))  # noqa: E731
    state = decoder_state(folder, cfg, FAMILIES[cfg.family], keep, dtype)
    if cfg.tie_word_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=keep is None, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_buffers()  # built on the meta device with the module; make them real
    return model.eval()

