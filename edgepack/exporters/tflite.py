"""android target, LiteRT part: one .tflite with a `prefill` and a `decode` signature, converted by litert-torch.

    android/tflite/model_fp32.tflite   fp32 weights and activations
    android/tflite/model_int8.tflite   int8 per-channel weights (Hadamard-rotated; the tied embedding / lm_head
                                       stay fp32), dynamic int8 activations
    android/tflite/model_int4.tflite   asymmetric int4 weights in blocks of 32 (model/offset_linear.py), dynamic int8
                                       activations
    android/model_info.json            signatures, tensor names, shapes, context length, eos ids (an app reads it)
    android/baseline/tflite/model_int4.tflite   ai-edge-quantizer's plain symmetric blockwise int4, measured beside it

Signatures (int32 ids and positions; C = context_length, P = prefill length, L layers):
    prefill(tokens [1, P], position [1], length [1], k_0..k_{L-1}, v_0..v_{L-1} [1, kv heads, C, head dim])
        tokens padded after `length`; position = cache slot of tokens[0], so a long prompt is prefilled in chunks
    decode(tokens [1, 1], position [1], k_*, v_* as above)
    both -> logits [1, vocab] (after the last real token), k_new / v_new [L, 1, kv heads, T, head dim]

The cache is read, never written, by the graph: attention runs over [cache ; this step's keys] and the step's
keys and values come out as k_new / v_new, which the app (or edgepack's runner) writes into the cache inputs'
buffers at `position`. So a decode step moves one token's keys, not the whole cache, through the interpreter's
inputs and outputs — the full-cache-in, full-cache-out form copies 2 × 47 MB per token at C = 2048 for the
default model. GQA groups the query heads per KV head instead of repeating the cache (a repeat would copy it).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from edgepack.artifacts import BASELINE_DIR, write_json
from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, eos_ids, register
from edgepack.model.offset_linear import with_offset_linears
from edgepack.native import modules_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import TargetSpec

FOLDER = "tflite"
MODEL_INFO = "model_info.json"
PREFILL_LENGTH = 128
FILE_NAMES = {"fp32": "model_fp32.tflite", "int8": "model_int8.tflite", "int4": "model_int4.tflite"}


class Signatures(nn.Module):
    """The reference decoder's weights, run the way the .tflite's signatures run them (see the module docstring)."""

    def __init__(self, model, with_length: bool):
        super().__init__()
        self.model = model
        self.with_length = with_length
        cfg = model.cfg
        self.layers, self.kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.group = cfg.num_heads // cfg.num_kv_heads

    def forward(self, tokens, position, **inputs):
        """tokens [1, T] int32, position [1] int32, (length [1] int32,) k_0…k_{L-1}, v_0…v_{L-1} (named inputs)."""
        m = self.model
        length = inputs.get("length")
        k_caches = [inputs[f"k_{i}"] for i in range(self.layers)]
        v_caches = [inputs[f"v_{i}"] for i in range(self.layers)]
        steps, capacity = tokens.shape[1], k_caches[0].shape[2]
        positions = position + torch.arange(steps, dtype=torch.int32)
        freqs = positions.float()[:, None] * m.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        floor = torch.finfo(torch.float32).min
        old = torch.where(torch.arange(capacity, dtype=torch.int32)[None, :] < position, 0.0, floor)  # [1, C]
        new = torch.full((steps, steps), floor).triu(1)  # causal within this step's tokens
        mask = torch.cat((old.expand(steps, capacity), new), dim=-1).repeat(self.group, 1)  # [group·T, C + T]
        x = m.embed(tokens)
        k_new, v_new = [], []
        for layer, k_cache, v_cache in zip(m.layers, k_caches, v_caches):
            attn, k, v = self._attention(layer.attn, layer.attn_norm(x), cos, sin, mask, k_cache, v_cache)
            x = x + attn
            x = x + layer.mlp(layer.mlp_norm(x))
            k_new.append(k)
            v_new.append(v)
        if length is not None:  # the logits after the last real token only: lm_head on one row, not P
            x = x.index_select(1, length - 1)
        return {"logits": m.lm_head(m.norm(x))[:, -1], "k_new": torch.stack(k_new), "v_new": torch.stack(v_new)}

    def _attention(self, attn, x, cos, sin, mask, k_cache, v_cache):
        cfg = attn.cfg
        steps = x.shape[1]
        q = attn.q(x).view(1, steps, cfg.num_heads, cfg.head_dim)
        k = attn.k(x).view(1, steps, cfg.num_kv_heads, cfg.head_dim)
        v = attn.v(x).view(1, steps, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        half = cfg.head_dim // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
        # query heads grouped per KV head: [1, kv, group·T, D]; head h reads KV head h // group, as in repeat_kv
        q = q.reshape(1, self.kv_heads, self.group * steps, self.head_dim) * self.head_dim**-0.5
        scores = torch.cat((q @ k_cache.transpose(-1, -2), q @ k.transpose(-1, -2)), dim=-1) + mask
        probs = torch.softmax(scores, dim=-1)
        capacity = k_cache.shape[2]
        out = probs[..., :capacity] @ v_cache + probs[..., capacity:] @ v  # [1, kv, group·T, D]
        out = out.reshape(1, cfg.num_heads, steps, self.head_dim).transpose(1, 2).reshape(1, steps, -1)
        return attn.o(out), k, v


def sample_inputs(model, steps: int, with_length: bool) -> dict[str, torch.Tensor]:
    """Named sample inputs of a signature (litert-torch names the .tflite's inputs after them)."""
    cfg = model.cfg
    cache = torch.zeros(1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)
    values = {"tokens": torch.zeros(1, steps, dtype=torch.int32), "position": torch.zeros(1, dtype=torch.int32)}
    if with_length:
        values["length"] = torch.tensor([steps], dtype=torch.int32)
    # a clone each: inputs given as one shared tensor would be traced as one input
    return values | {name: cache.clone() for name in input_names(cfg.num_layers, with_length)[len(values):]}


def input_names(layers: int, with_length: bool) -> list[str]:
    return ["tokens", "position", *(["length"] if with_length else []),
            *[f"k_{i}" for i in range(layers)], *[f"v_{i}" for i in range(layers)]]


def convert(model, path: Path, prefill_length: int) -> Path:
    """litert-torch: both signatures into one fp32 .tflite at path."""
    with quiet_stderr():  # it imports torchao and jax, which log at import
        import litert_torch

    logging.getLogger("absl").setLevel(logging.ERROR)
    litert_torch.config.show_progress = False  # edgepack prints its own progress line per variant
    converter = litert_torch
    for name, steps, with_length in (("prefill", prefill_length, True), ("decode", 1, False)):
        module = Signatures(model, with_length).eval()
        converter = converter.signature(name, module, sample_kwargs=sample_inputs(model, steps, with_length))
    with torch.inference_mode(), quiet_stderr():  # the MLIR converter logs every pass to fd 2
        edge = converter.convert()
        path.parent.mkdir(parents=True, exist_ok=True)
        edge.export(str(path))
    return path


def recipe(variant: str, plain: bool = False):
    """ai-edge-quantizer recipe of a variant (dynamic: int weights, activations quantized to int8 at run time).

    int8: per-channel int8 with Hadamard rotations on the transformer layers (plain per-channel: top-1 0.905 on
      the default model; rotated 0.945), the lm_head / tied embedding left fp32 (0.955).
    int4: blocks of 32, applied to the OffsetLinear graph: the symmetric 4-bit weights are read back exactly
      (dequantized-weight recovery), the block offsets stay fp32, lm_head and embedding int8 per channel.
      plain: ai-edge-quantizer's symmetric blockwise int4 (as dynamic_wi4b32_afp32) on the fp32 graph's
      transformer layers, the lm_head / embedding left fp32 (an all-zero padding row would otherwise get a scale
      XNNPACK refuses): the baseline validate shows beside it.
    """
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    fc, embedding = qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP
    manager = recipe_manager.RecipeManager()  # a later entry overrides an earlier one for the tensors it matches
    if plain:
        manager.add_dynamic_config(regex=".*", operation_name=fc, num_bits=4,
                                   granularity=qtyping.QuantGranularity.BLOCKWISE_32)
        manager.add_quantization_config(regex=".*logits.*", operation_name=fc, algorithm_key=AlgorithmName.NO_QUANTIZE)
    elif variant == "int8":
        manager.add_dynamic_config(regex=".*", operation_name=fc, num_bits=8,
                                   algorithm_key=AlgorithmName.DECOMPOSED_HADAMARD_ROTATION)
        manager.add_quantization_config(regex=".*logits.*", operation_name=fc, algorithm_key=AlgorithmName.NO_QUANTIZE)
    else:
        manager.add_dynamic_config(regex=".*", operation_name=fc, num_bits=4,
                                   granularity=qtyping.QuantGranularity.BLOCKWISE_32,
                                   algorithm_key=AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY)
        manager.add_quantization_config(regex=".*Linear_offset.*", operation_name=fc,
                                        algorithm_key=AlgorithmName.NO_QUANTIZE)
        manager.add_dynamic_config(regex=".*logits.*", operation_name=fc, num_bits=8)
        manager.add_dynamic_config(regex=".*", operation_name=embedding, num_bits=8)
    return manager.get_quantization_recipe()


def quantize(src: Path, quant_recipe, dest: Path) -> Path:
    """ai-edge-quantizer's quantizer with a recipe on a .tflite."""
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(src))
    q.load_quantization_recipe(quant_recipe)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):  # it prints a size summary per model
        q.quantize().export_model(str(dest), overwrite=True)
    return dest


def model_info(model, prefill_length: int, eos_ids: list[int]) -> dict:
    cfg = model.cfg
    cache = [1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim]
    layers = cfg.num_layers

    def signature(steps, with_length):
        shapes = {"tokens": [1, steps], "position": [1], **({"length": [1]} if with_length else {})}
        shapes |= {name: cache for name in input_names(layers, with_length)[len(shapes):]}
        return {
            "inputs": {n: {"shape": s, "dtype": "float32" if n[0] in "kv" else "int32"} for n, s in shapes.items()},
            "outputs": {"logits": {"shape": [1, cfg.vocab_size], "dtype": "float32"},
                        "k_new": {"shape": [layers, 1, cfg.num_kv_heads, steps, cfg.head_dim], "dtype": "float32"},
                        "v_new": {"shape": [layers, 1, cfg.num_kv_heads, steps, cfg.head_dim], "dtype": "float32"}},
        }

    return {
        "format": "tflite", "family": cfg.family, "context_length": cfg.context_length,
        "prefill_length": prefill_length, "num_layers": layers, "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "eos_token_ids": eos_ids,
        "signatures": {"prefill": signature(prefill_length, True), "decode": signature(1, False)},
        "usage": ("Prompt longer than prefill_length: call prefill on chunks of it with position = chunk start. "
                  "prefill pads tokens after `length`. After each call write k_new[l][:, :, :n] / v_new[l] into "
                  "inputs k_l / v_l at slots position..position+n-1 (n = length, or 1 for decode); the graph "
                  "reads the cache, it does not return it."),
        "files": FILE_NAMES,
    }


@register
class TfliteExporter(Exporter):
    format = "tflite"
    version = "1"

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("litert_torch", "ai_edge_quantizer")

    @classmethod
    def notes(cls) -> str:
        return (f"litert-torch, prefill ({PREFILL_LENGTH} tokens, chunked) + decode signatures; int8 / int4 by "
                "ai-edge-quantizer (int4 asymmetric blocks of 32 through OffsetLinear)")

    def __init__(self):
        self._model = None
        self._work = None

    def _converted(self, source: Source, target: TargetSpec, offsets: bool) -> Path:
        """The fp32 conversion a variant starts from (offsets: the OffsetLinear graph int4 needs), made once."""
        if self._work is None:
            from edgepack.model.weights import load_decoder

            self._model = load_decoder(source.path, target.context_length)
            self._work = Path(tempfile.mkdtemp(prefix="edgepack-tflite-"))
        path = self._work / ("offsets.tflite" if offsets else "fp32.tflite")
        if not path.exists():
            convert(with_offset_linears(self._model) if offsets else self._model, path, PREFILL_LENGTH)
        return path

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        if variant not in FILE_NAMES:
            raise EdgepackError(f"tflite: unknown variant '{variant}'; valid: {', '.join(FILE_NAMES)}")
        fp32 = self._converted(source, target, offsets=False)
        write_json(out / MODEL_INFO, model_info(self._model, PREFILL_LENGTH, eos_ids(source.path)))
        path = out / FOLDER / FILE_NAMES[variant]
        path.parent.mkdir(parents=True, exist_ok=True)
        if variant == "fp32":
            shutil.copyfile(fp32, path)
            return [path]
        if variant == "int8":
            return [quantize(fp32, recipe("int8"), path)]
        plain = quantize(fp32, recipe("int4", plain=True), out / BASELINE_DIR / FOLDER / FILE_NAMES[variant])
        return [quantize(self._converted(source, target, offsets=True), recipe("int4"), path), plain]

    def finish(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
        self._model = self._work = None
        gc.collect()
