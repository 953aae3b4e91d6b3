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
    decode_256, decode_512, decode_1024 (those below C): decode with the same inputs, attention over the first
        S cache slots only; use the smallest S ≥ position (the runner and the Kotlin sample move up as a chat grows)
    all -> logits [1, vocab] (after the last real token), k_new / v_new [L, 1, kv heads, T, head dim]

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
from edgepack.errors import EdgepackError, in_child
from edgepack.exporters.base import Exporter, register
from edgepack.model.cache import ReadOnlyCache
from edgepack.model.offset_linear import with_offset_linears
from edgepack.model_info import MODEL_INFO, eos_ids, input_names, tflite_info
from edgepack.native import modules_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import TargetSpec

FOLDER = "tflite"
PREFILL_LENGTH = 128
# decode_<S> reads only the first S cache slots: a chat's first hundreds of tokens do not pay for the whole context
# (decode at 2048 slots read 94 MB of cache per token on the default model, more than its int8 weights)
DECODE_WINDOWS = (256, 512, 1024)
FILE_NAMES = {"fp32": "model_fp32.tflite", "int8": "model_int8.tflite", "int4": "model_int4.tflite"}


class Signatures(nn.Module):
    """The reference decoder run the way the .tflite's signatures run it (see the module docstring)."""

    def __init__(self, model, with_length: bool, window: int | None = None):
        super().__init__()
        self.model = model
        self.with_length = with_length
        self.window = window  # decode_<window>: attention reads only the cache's first `window` slots
        self.layers = model.cfg.num_layers

    def forward(self, tokens, position, **inputs):
        """tokens [1, T] int32, position [1] int32, (length [1] int32,) k_0…k_{L-1}, v_0…v_{L-1} (named inputs)."""
        read = (lambda c: c) if self.window is None else (lambda c: c[:, :, :self.window])  # noqa: E731
        cache = ReadOnlyCache([read(inputs[f"k_{i}"]) for i in range(self.layers)],
                              [read(inputs[f"v_{i}"]) for i in range(self.layers)], position, tokens.shape[1])
        positions = position + torch.arange(tokens.shape[1], dtype=torch.int32)
        x = self.model.hidden(tokens, positions, cache)
        if self.with_length:  # the logits after the last real token only: lm_head on one row, not P
            x = x.index_select(1, inputs["length"] - 1)
        return {"logits": self.model.lm_head(x)[:, -1], "k_new": torch.stack(cache.keys),
                "v_new": torch.stack(cache.values)}


def sample_inputs(model, steps: int, with_length: bool) -> dict[str, torch.Tensor]:
    """Named sample inputs of a signature (litert-torch names the .tflite's inputs after them)."""
    cfg = model.cfg
    values = {"tokens": torch.zeros(1, steps, dtype=torch.int32), "position": torch.zeros(1, dtype=torch.int32)}
    if with_length:
        values["length"] = torch.tensor([steps], dtype=torch.int32)
    return values | {name: cache_sample(cfg) for name in input_names(cfg.num_layers, with_length)[len(values):]}


def cache_sample(cfg) -> torch.Tensor:
    """One cache input's sample: a tensor of its own (inputs given as one shared tensor would be traced as one
    input), allocated but never written. Tracing reads only its shape, and every signature's samples live through the
    whole conversion: as zeros they were resident, 5 signatures × 2 × layers caches (Phi-4-mini at 2048 slots:
    2.7 GB, most of what the conversion held beyond the weights); untouched pages are not."""
    return torch.empty(1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)


def decode_windows(capacity: int) -> dict[str, int]:
    """The short decode signatures of a context length: decode_256 … (each window below the capacity)."""
    return {f"decode_{w}": w for w in DECODE_WINDOWS if w < capacity}


def convert(model, path: Path, prefill_length: int) -> Path:
    """litert-torch: prefill, decode and the short decode_<window> signatures into one fp32 .tflite at path."""
    signatures = [("prefill", Signatures(model, True).eval(), sample_inputs(model, prefill_length, True)),
                  ("decode", Signatures(model, False).eval(), sample_inputs(model, 1, False))]
    signatures += [(name, Signatures(model, False, window).eval(), sample_inputs(model, 1, False))
                   for name, window in decode_windows(model.cfg.context_length).items()]
    return convert_signatures(signatures, path)


def convert_signatures(signatures, path: Path) -> Path:
    """litert-torch: [(name, module, named sample inputs)] into one fp32 .tflite at path, weights shared."""
    with quiet_stderr():  # it imports torchao and jax, which log at import
        import litert_torch

    logging.getLogger("absl").setLevel(logging.ERROR)
    litert_torch.config.show_progress = False  # edgepack prints its own progress line per variant
    converter = litert_torch
    for name, module, sample in signatures:
        converter = converter.signature(name, module, sample_kwargs=sample)
    with torch.inference_mode(), quiet_stderr():  # the MLIR converter logs every pass to fd 2
        # lightweight_conversion: litert-torch's own large-model mode (constants handled lazily, then folded by the
        # LiteRT runtime). Measured on the 494M model's fp32 .tflite: peak RSS 7.53 → 3.45 GB, 212 → 107 s, and the
        # same logits (max|Δ| 0.0 over a 55-token prefill and two decode steps; the tiny 2-layer shape too).
        edge = converter.convert(lightweight_conversion=True)
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
      transformer layers and int8 per channel on the lm_head and the embedding, as int4's own (blockwise int4
      would give an all-zero padding row a scale XNNPACK refuses): the baseline validate shows beside it.
      Its head was fp32 once: XNNPACK packs the head for each of the five signatures, and the 1.24B model's
      baseline then held about 11 GB in validate (a 1 GB fp32 head, five times); an int8 head is a quarter of it.
      The embedding goes with it: a tied table quantized for the head alone was written once per signature (the
      1.24B baseline: a 7.1 GB file; now 0.82 GB).
    """
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    fc, embedding = qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP
    manager = recipe_manager.RecipeManager()  # a later entry overrides an earlier one for the tensors it matches
    # With one KV head (Gemma 3 1B) attention's q·kᵀ has no batch and lowers to FULLY_CONNECTED whose "weight" is
    # the cache: its output is named after the Attention module itself, not one of its Linears. Left alone.
    attention_scores = ".*Attention_attn;[^/]*$"
    if plain:
        manager.add_dynamic_config(regex=".*", operation_name=fc, num_bits=4,
                                   granularity=qtyping.QuantGranularity.BLOCKWISE_32)
        manager.add_dynamic_config(regex=".*logits.*", operation_name=fc, num_bits=8)
        manager.add_dynamic_config(regex=".*", operation_name=embedding, num_bits=8)
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
    manager.add_quantization_config(regex=attention_scores, operation_name=fc, algorithm_key=AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def quantize(src: Path, quant_recipe, dest: Path) -> Path:
    """ai-edge-quantizer's quantizer with a recipe on a .tflite, in a child process of its own: the quantizer leaves
    its process larger than it found it (1.24B int8: 0.6 → 2.3 GB), and the next conversion's peak stacked on that
    (1.24B int8 then int4's conversion: 9.65 GB, where each alone is 7.1 GB)."""
    try:
        return in_child(_quantize, src, quant_recipe, dest, disk=dest.parent, again="export again",
                        process=f"tflite: quantizing {src.name} → {dest.name}: the quantizer's process")
    except EdgepackError:
        dest.unlink(missing_ok=True)
        raise


def _quantize(src: Path, quant_recipe, dest: Path) -> Path:
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(src))
    q.load_quantization_recipe(quant_recipe)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # serialize_to_path: the quantizer writes the file through a memory map as it packs each buffer, instead of
    # building the whole model in a bytearray first (494M int8: peak 3.09 → 1.88 GB, the same bytes).
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):  # it prints a size summary per model
        q.quantize(serialize_to_path=str(dest))
    return dest


def _convert_source(exporter: type, source_path: str, context_length: int, offsets: bool, path: str):
    """In a child process (TfliteExporter._converted): load the decoder, convert it to path, return its config."""
    from edgepack.model.weights import load_decoder

    model = load_decoder(Path(source_path), context_length)
    exporter._convert(with_offset_linears(model, inplace=True) if offsets else model, Path(path))
    return model.cfg


@register
class TfliteExporter(Exporter):
    format = "tflite"
    version = "4"  # 2: decode_<S> signatures; 3: litert-torch's lightweight conversion; 4: int8 head in int4's baseline

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("litert_torch", "ai_edge_quantizer")

    @classmethod
    def notes(cls) -> str:
        return (f"litert-torch, prefill ({PREFILL_LENGTH} tokens, chunked) + decode signatures (and the short-cache "
                "decode_256/512/1024); int8 / int4 by ai-edge-quantizer (int4 asymmetric blocks of 32 through OffsetLinear)")

    def __init__(self):
        self._cfg = None
        self._work = None

    def _converted(self, source: Source, target: TargetSpec, offsets: bool) -> Path:
        """The fp32 conversion a variant starts from (offsets: the OffsetLinear graph int4 needs), made once.

        Each conversion runs in a child process of its own, which loads the model, converts it and exits. litert-torch
        keeps the traced graphs and the weights alive after it returns, out of Python's reach (494M: resident 3.19 GB
        after `del model` and gc.collect(), the model alone 2.0 GB; no Python referrer holds them), and the quantizer
        that runs next reads the .tflite: in this process they would sit beside it (494M int4: 5.59 GB peak). A child
        costs about 6 s of imports."""
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix=f"edgepack-{self.format}-"))
        path = self._work / ("offsets.tflite" if offsets else "fp32.tflite")
        if not path.exists():
            try:
                self._cfg = in_child(_convert_source, type(self), str(source.path), target.context_length, offsets,
                                     str(path), process=f"{self.format}: the conversion's process",
                                     disk=self._work, again="export again")
            except EdgepackError:
                path.unlink(missing_ok=True)
                raise
        return path

    @staticmethod
    def _convert(model, path: Path) -> Path:
        return convert(model, path, PREFILL_LENGTH)

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        if variant not in FILE_NAMES:
            raise EdgepackError(f"tflite: unknown variant '{variant}'; valid: {', '.join(FILE_NAMES)}")
        fp32 = self._converted(source, target, offsets=False)
        write_json(out / MODEL_INFO, tflite_info(self._cfg, PREFILL_LENGTH, eos_ids(source.path), FILE_NAMES,
                                                 decode_windows(target.context_length)))
        path = out / FOLDER / FILE_NAMES[variant]
        path.parent.mkdir(parents=True, exist_ok=True)
        if variant == "fp32":
            shutil.copyfile(fp32, path)
            return [path]
        if variant == "int8":
            return [quantize(fp32, recipe("int8"), path)]
        # the second conversion before this process quantizes anything: the child's load of the model is the peak,
        # and the quantizer leaves this process larger (1.24B int4: 8.67 GB with the plain int4 quantized first)
        offsets = self._converted(source, target, offsets=True)
        plain = quantize(fp32, recipe("int4", plain=True), out / BASELINE_DIR / FOLDER / FILE_NAMES[variant])
        return [quantize(offsets, recipe("int4"), path), plain]

    def finish(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
        self._cfg = self._work = None
        gc.collect()
