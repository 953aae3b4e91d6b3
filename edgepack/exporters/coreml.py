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

import numpy as np
import torch
from torch import nn

from edgepack.artifacts import BASELINE_DIR, write_json
from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register
from edgepack.model.cache import StateCache
from edgepack.model.decoder import RMSNorm
from edgepack.model.offset_linear import with_offset_linears
from edgepack.model_info import MODEL_INFO, coreml_info, eos_ids
from edgepack.native import modules_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import TargetSpec

FOLDER = "coreml"
FILE_NAMES = {"fp16": "model_fp16.mlpackage", "int4": "model_int4.mlpackage", "int8": "model_int8.mlpackage"}
BLOCK = 32


class StatefulDecoder(nn.Module):
    """The reference decoder with the cache in fp16 buffers that Core ML turns into state, and fp16-safe norms."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.fp16_safe = True
        self.register_buffer("k_cache", torch.zeros(model.cache_shape(), dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(model.cache_shape(), dtype=torch.float16))

    def forward(self, input_ids, causal_mask):
        end = causal_mask.shape[-1]
        past = end - input_ids.shape[1]
        cache = StateCache(self.k_cache, self.v_cache, causal_mask, past, end)
        return self.model.lm_head(self.model.hidden(input_ids, torch.arange(past, end), cache))


def _coremltools():
    """coremltools, imported quietly (on Linux it prints that its native Core ML proxies are missing)."""
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        import coremltools

    return coremltools


def convert(model):
    """coremltools: trace the stateful decoder and convert it to an fp16 ML Program for iOS 18."""
    ct = _coremltools()

    cfg = model.cfg
    module = StatefulDecoder(model).eval()
    sample = (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 5, dtype=torch.float16))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, sample)
    steps, end = ct.RangeDim(1, cfg.context_length), ct.RangeDim(1, cfg.context_length)
    shape = tuple(module.k_cache.shape)
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name="input_ids", shape=(1, steps), dtype=np.int32),
                    ct.TensorType(name="causal_mask", shape=(1, 1, steps, end), dtype=np.float16)],
            outputs=[ct.TensorType(name="logits", dtype=np.float16)],
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
    version = "2"  # 2: fused scaled_dot_product_attention

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("coremltools")

    @classmethod
    def notes(cls) -> str:
        return "stateful KV cache (iOS 18), flexible T/E; int4 asymmetric blocks of 32 through OffsetLinear"

    def __init__(self):
        self._model = None
        self._converted: dict[bool, object] = {}

    def _mlmodel(self, source: Source, target: TargetSpec, offsets: bool):
        if self._model is None:
            from edgepack.model.weights import load_decoder

            logging.getLogger("coremltools").setLevel(logging.ERROR)
            self._model = load_decoder(source.path, target.context_length)
        if offsets not in self._converted:
            self._converted[offsets] = convert(with_offset_linears(self._model) if offsets else self._model)
        return self._converted[offsets]

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        if variant not in FILE_NAMES:
            raise EdgepackError(f"coreml: unknown variant '{variant}'; valid: {', '.join(FILE_NAMES)}")
        fp16 = self._mlmodel(source, target, offsets=False)
        write_json(out / MODEL_INFO, coreml_info(self._model.cfg, eos_ids(source.path), FILE_NAMES))
        path = out / FOLDER / FILE_NAMES[variant]
        if variant == "fp16":
            files = [save(fp16, path)]
        elif variant == "int8":
            files = [save(quantize(fp16, "int8"), path)]
        else:
            plain = save(quantize(fp16, "int4", plain=True), out / BASELINE_DIR / FOLDER / FILE_NAMES[variant])
            files = [save(quantize(self._mlmodel(source, target, offsets=True), "int4"), path), plain]
        return [f for package in files for f in sorted(package.rglob("*")) if f.is_file()]

    def finish(self) -> None:
        self._model = None
        self._converted.clear()
        gc.collect()
