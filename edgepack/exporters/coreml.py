"""ios target: a Core ML ML Program (.mlpackage, iOS 18 / macOS 15) with the KV cache as Core ML state.

    ios/coreml/model_fp16.mlpackage   fp16 weights and compute
    ios/coreml/model_int4.mlpackage   asymmetric int4 weights in blocks of 32 (model/offset_linear.py),
                                      fp16 compute
    ios/coreml/model_int8.mlpackage   int8 per-channel weights (not in the default list)
    ios/model_info.json               inputs, outputs, states, shapes, context length, eos ids (an app reads it)
    ios/baseline/coreml/model_int4.mlpackage   coremltools' plain linear_symmetric int4 per block of 32

Interface: inputs `input_ids` [1, T] int32 and `causal_mask` [1, 1, T, E] fp16 (0 where visible, -inf-like
elsewhere; E = tokens in the cache after this call, so the tokens already cached are E − T); output `logits`
[1, T, vocab]; states `k_cache`, `v_cache` [layers, 1, kv heads, context, head dim] fp16, written in place at
slots E − T … E − 1. T and E are flexible (RangeDim 1…context): one function serves prefill (T = prompt) and
decode (T = 1), and attention reads only the E slots in use. Enumerated shapes would pin the prompt length or
pad every decode step to the full context; the Neural Engine prefers fixed shapes, but for a 135M–1B decoder the
GPU/CPU run flexible shapes well, which is the layout Apple's own Llama-on-Core-ML example uses.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from edgepack.artifacts import BASELINE_DIR, write_json
from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register
from edgepack.model.cache import StateCache
from edgepack.model.decoder import Block, RMSNorm
from edgepack.model.offset_linear import with_offset_linears
from edgepack.model_info import MODEL_INFO, coreml_info, eos_ids
from edgepack.native import modules_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import TargetSpec

FOLDER = "coreml"
FILE_NAMES = {"fp16": "model_fp16.mlpackage", "int4": "model_int4.mlpackage", "int8": "model_int8.mlpackage"}
BLOCK = 32


# Parameters per Core ML program. Above it the model is converted as a chain of packages, a slice of layers each
# (Apple's own recipe for large models on Core ML: chunked programs), so the converter never holds more than one
# slice: coremltools holds the traced graph's weights several times over while it converts (measured: a 389M-
# parameter slice peaks at 6.5 GB, 1.6 GB of it the fp32 slice itself; the whole 494M model at 11.1 GB). The
# embedding rides in the first package and the head in the last (a tied table is stored in both), so a slice is
# never smaller than the table plus one layer: where that is larger, it is the slice size.
CHUNK_PARAMS = 300_000_000


def _layer_params(cfg) -> list[int]:
    """Parameters per transformer layer, the embedding counted with the first and the head with the last."""
    with torch.device("meta"):
        block = sum(p.numel() for p in Block(cfg).parameters())
    table = cfg.vocab_size * cfg.hidden_size
    sizes = [block] * cfg.num_layers
    sizes[0] += table
    sizes[-1] += table + cfg.hidden_size
    return sizes


def chunk_plan(cfg) -> list[range]:
    """The layers of each package, in order: one range (the whole model) when it holds CHUNK_PARAMS or fewer,
    else slices of at most max(CHUNK_PARAMS, the table plus a layer), one layer at least."""
    sizes = _layer_params(cfg)
    budget = max(CHUNK_PARAMS, *sizes)
    plan, start, held = [], 0, 0
    for i, size in enumerate(sizes):
        if held and held + size > budget:
            plan.append(range(start, i))
            start, held = i, 0
        held += size
    return plan + [range(start, cfg.num_layers)]


def package_names(variant: str, chunks: int) -> list[str]:
    """model_fp16.mlpackage, or model_fp16_1of3.mlpackage … model_fp16_3of3.mlpackage for a chained model."""
    stem = FILE_NAMES[variant].removesuffix(".mlpackage")
    if chunks == 1:
        return [FILE_NAMES[variant]]
    return [f"{stem}_{i + 1}of{chunks}.mlpackage" for i in range(chunks)]


class StatefulChunk(nn.Module):
    """Layers `layers` of the reference decoder with their cache rows in fp16 buffers that Core ML turns into
    state, and fp16-safe norms. The first slice takes input_ids, the last returns logits; between slices the
    hidden states [1, T, hidden] pass as fp16 (the precision they have inside one fp16 program). The whole model
    is one slice holding every layer."""

    def __init__(self, model, layers: range):
        super().__init__()
        self.model, self.layers = model, layers
        self.first, self.last = layers.start == 0, layers.stop == model.cfg.num_layers
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.fp16_safe = True
        shape = (len(layers), *model.cache_shape()[1:])
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, x, causal_mask):
        end = causal_mask.shape[-1]
        past = end - x.shape[1]
        cache = StateCache(self.k_cache, self.v_cache, causal_mask, past, end, first=self.layers.start)
        x = self.model.embedding(x) if self.first else x
        x = self.model.blocks(x, torch.arange(past, end), cache, self.layers)
        return self.model.lm_head(self.model.norm(x)) if self.last else x


def load_chunk(folder, cfg, layers: range):
    """The reference decoder with only `layers`' weights (and the embedding / final norm and head where the slice
    holds them) read from the checkpoint; the other modules are emptied, so nothing else is held."""
    from edgepack.model.weights import load_decoder

    first, last = layers.start == 0, layers.stop == cfg.num_layers

    def keep(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        return (first and name == "embed.weight") or (last and name in ("norm.weight", "lm_head.weight"))

    model = load_decoder(folder, cfg.context_length, keep=keep)
    for i in range(cfg.num_layers):
        if i not in layers:
            model.layers[i] = nn.Module()
    if not first:
        model.embed = nn.Module()
    if not last:
        model.norm, model.lm_head = nn.Module(), nn.Module()
    return model


def _coremltools():
    """coremltools, imported quietly (on Linux it prints that its native Core ML proxies are missing)."""
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        import coremltools

    return coremltools


def _fp16_overflow(op) -> bool:
    """coremltools' FP16ComputePrecision.fp16_overflow (does an fp32 constant input hold a finite value past fp16's
    65504?), the same answer computed a slice at a time. Written by hand because coremltools 9.0's version takes
    np.where's index arrays over the whole constant (three int64 arrays of a 3-D view, 24 bytes an element):
    converting a 151936 × 896 embedding took 4.4 GB more than the table itself (measured; the transformer layers'
    constants are small enough not to matter)."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                flat = np.asarray(var.op.val.val).reshape(-1)
                for start in range(0, flat.size, 1 << 22):
                    part = np.abs(flat[start:start + (1 << 22)])
                    if np.max(part[part < 1e38], initial=0.0) > 65504:
                        return True
    return False


def convert(module: StatefulChunk):
    """coremltools: trace one slice (or the whole decoder) and convert it to an fp16 ML Program for iOS 18."""
    ct = _coremltools()

    cfg = module.model.cfg
    module = module.eval()
    x = torch.zeros(1, 2, dtype=torch.int32) if module.first else torch.zeros(1, 2, cfg.hidden_size)
    sample = (x, torch.zeros(1, 1, 2, 5, dtype=torch.float16))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, sample)
    steps, end = ct.RangeDim(1, cfg.context_length), ct.RangeDim(1, cfg.context_length)
    shape = tuple(module.k_cache.shape)
    first = (ct.TensorType(name="input_ids", shape=(1, steps), dtype=np.int32) if module.first else
             ct.TensorType(name="hidden_in", shape=(1, steps, cfg.hidden_size), dtype=np.float16))
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()), \
            mock.patch.object(FP16ComputePrecision, "fp16_overflow", staticmethod(_fp16_overflow)):
        mlmodel = ct.convert(
            traced,
            inputs=[first, ct.TensorType(name="causal_mask", shape=(1, 1, steps, end), dtype=np.float16)],
            outputs=[ct.TensorType(name="logits" if module.last else "hidden_out", dtype=np.float16)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name="k_cache"),
                    ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name="v_cache")],
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,  # Core ML itself exists only on macOS; nothing here needs the compiled model
        )
    return mlmodel


def quantize(mlmodel, variant: str, plain: bool = False):
    """coremltools' own weight quantizer.

    int4 (applied to the OffsetLinear graph): affine ("linear") int4 per block of 32, which reads OffsetLinear's
      symmetric levels back exactly; embedding / lm_head int8 per channel (as llama.cpp's Q4_K_M keeps its output
      matrix at 6-8 bits); the per-block offsets int8 per channel too (fp16 offsets: KL 0.0010 / top-1 0.965 at
      0.356× the fp16 package; int8: 0.0013 / 0.955 at 0.345×, inside the issue's 0.35× size bar).
    plain (the baseline): linear_symmetric int4 per block of 32 on the original weights, embedding / lm_head int8.
    int8: linear_symmetric per channel everywhere.
    """
    _coremltools()
    import coremltools.optimize.coreml as cto

    int8 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    if variant == "int8":
        config = cto.OptimizationConfig(global_config=int8)
    else:
        int4 = cto.OpLinearQuantizerConfig(mode="linear_symmetric" if plain else "linear", dtype="int4",
                                           granularity="per_block", block_size=BLOCK)
        names = [op.name for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "const"]
        by_name = {n: int8 for n in names if n.startswith(("model_embed_weight", "model_lm_head_weight"))}
        offsets = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                              weight_threshold=0)
        by_name |= {n: offsets for n in names if "_offset_weight" in n}
        config = cto.OptimizationConfig(global_config=int4, op_name_configs=by_name)
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        return cto.linear_quantize_weights(mlmodel, config=config)


def save(mlmodel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_stderr():
        mlmodel.save(str(path))
    return path


@register
class CoreMLExporter(Exporter):
    format = "coreml"
    version = "3"  # 2: fused scaled_dot_product_attention; 3: chained packages above CHUNK_PARAMS

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("coremltools")

    @classmethod
    def notes(cls) -> str:
        return "stateful KV cache (iOS 18), flexible T/E; int4 asymmetric blocks of 32 through OffsetLinear"

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        """Each package of the variant: the slice's weights read, converted (and quantized), saved and freed before
        the next, so the peak follows the largest slice, not the model."""
        if variant not in FILE_NAMES:
            raise EdgepackError(f"coreml: unknown variant '{variant}'; valid: {', '.join(FILE_NAMES)}")
        from edgepack.model.config import DecoderConfig, read_config

        logging.getLogger("coremltools").setLevel(logging.ERROR)
        cfg = DecoderConfig.from_hf(read_config(source.path), target.context_length)
        plan = chunk_plan(cfg)
        names = {v: package_names(v, len(plan)) for v in FILE_NAMES}
        write_json(out / MODEL_INFO, coreml_info(cfg, eos_ids(source.path), names, plan))
        packages = []
        for layers, name in zip(plan, names[variant]):
            model = load_chunk(source.path, cfg, layers)
            path = out / FOLDER / name
            if variant == "fp16":
                packages.append(save(convert(StatefulChunk(model, layers)), path))
            elif variant == "int8":
                packages.append(save(quantize(convert(StatefulChunk(model, layers)), "int8"), path))
            else:
                plain = quantize(convert(StatefulChunk(model, layers)), "int4", plain=True)
                baseline = save(plain, out / BASELINE_DIR / FOLDER / name)
                del plain
                gc.collect()
                model = with_offset_linears(model, inplace=True)  # each Linear replaced as it is rewritten
                packages += [save(quantize(convert(StatefulChunk(model, layers)), "int4"), path), baseline]
            del model
            gc.collect()
        return [f for package in packages for f in sorted(package.rglob("*")) if f.is_file()]
