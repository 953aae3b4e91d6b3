"""android target, LiteRT-LM part: a .litertlm bundle that Google's LiteRT-LM engine loads and runs.

    android/litertlm/<slug>-int8.litertlm   variant litertlm-int8: the .tflite below, android/tflite int8's recipe
    android/litertlm/<slug>-int4.litertlm   variant litertlm-int4: android/tflite int4's recipe (OffsetLinear)
    android/litertlm/<slug>-fp32.litertlm   variant litertlm-fp32 (not in the default list)
    android/litertlm/model_info.json        the signatures inside, and what the bundle carries

Each bundle holds, built by litert-lm-builder: the .tflite (model type PREFILL_DECODE), the HF tokenizer.json, and
LlmMetadata made from the source: stop tokens (eos ids), the start token when the tokenizer adds one, the chat
template, max tokens = the context length, and `generic_model` as the model type.

The .tflite follows LiteRT-LM's PyTorch convention (its runtime/executor/litert_compiled_model_executor_utils.cc):
    prefill_<P>(tokens [1, P], input_pos [P], kv_cache_k_0.., kv_cache_v_0..) -> kv_cache_k_0.., kv_cache_v_0..
    decode(tokens [1, 1], input_pos [1], kv_cache_*) -> logits [1, 1, vocab], kv_cache_*
int32 ids and positions; caches [1, kv heads, C, head dim] fp32, one per layer and kind, each returned whole with
this step's keys written at input_pos[0]… (the engine swaps input and output buffers, so nothing is copied). No
`mask` input: the graph masks by position (the engine's "CPU only" PyTorch form). The engine pads a prefill with
position 0; the graph writes a chunk at input_pos[0] + 0..P-1, so padding lands only in slots not yet used.

The raw-Interpreter .tflite in android/tflite/ keeps its read-only cache + k_new / v_new contract: measured on the
default model, copying the whole cache in and out per step from Python costs more than writing one token's keys
(see README, "android: LiteRT-LM"); LiteRT-LM itself swaps the buffers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edgepack.artifacts import write_json
from edgepack.errors import EdgepackError
from edgepack.exporters import tflite
from edgepack.exporters.base import register
from edgepack.model.cache import TensorCache
from edgepack.model_info import MODEL_INFO, eos_ids, litertlm_info
from edgepack.native import modules_missing
from edgepack.source import Source
from edgepack.targets import TargetSpec

FOLDER = "litertlm"
PREFILL_LENGTH = 128
# variant -> tflite recipe (names unique per target); fp32 is not in the default list: the tests' exact check
VARIANTS = {"litertlm-int8": "int8", "litertlm-int4": "int4", "litertlm-fp32": "fp32"}
# LiteRT-LM's generic model hands a template each message's content as a list of parts ({"type": "text", "text"}),
# where HF templates expect a string ("tried to use + operator on unsupported types string and sequence"): the
# template in the bundle reads either.
CONTENT = "message['content']"
CONTENT_TEXT = ("(message['content'] if message['content'] is string "
                "else message['content'] | map(attribute='text') | join(''))")


def file_name(slug: str, variant: str) -> str:
    return f"{slug}-{variant}.litertlm"


class LitertLmSignature(nn.Module):
    """The reference decoder run as LiteRT-LM runs a signature (see the module docstring)."""

    def __init__(self, model, logits: bool):
        super().__init__()
        self.model, self.logits, self.layers = model, logits, model.cfg.num_layers

    def forward(self, tokens, input_pos, **caches):
        positions = input_pos[0] + torch.arange(tokens.shape[1], dtype=torch.int32)
        cache = TensorCache([caches[f"kv_cache_k_{i}"] for i in range(self.layers)],
                            [caches[f"kv_cache_v_{i}"] for i in range(self.layers)], positions, inplace=False)
        x = self.model.hidden(tokens, positions, cache)
        out = {"logits": self.model.lm_head(x)} if self.logits else {}
        for i in range(self.layers):
            out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = cache.keys[i], cache.values[i]
        return out


def sample_inputs(cfg, steps: int) -> dict[str, torch.Tensor]:
    values = {"tokens": torch.zeros(1, steps, dtype=torch.int32), "input_pos": torch.arange(steps, dtype=torch.int32)}
    for kind in "kv":
        for i in range(cfg.num_layers):
            values[f"kv_cache_{kind}_{i}"] = tflite.cache_sample(cfg)
    return values


def convert(model, path: Path) -> Path:
    return tflite.convert_signatures([
        (f"prefill_{PREFILL_LENGTH}", LitertLmSignature(model, logits=False).eval(), sample_inputs(model.cfg, PREFILL_LENGTH)),
        ("decode", LitertLmSignature(model, logits=True).eval(), sample_inputs(model.cfg, 1)),
    ], path)


def llm_metadata(source: Source, context_length: int):
    """LlmMetadata from the source's tokenizer and generation config."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    folder = source.path
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not template:
        raise EdgepackError(f"{folder}: no chat template (tokenizer_config.json or chat_template.jinja); LiteRT-LM "
                            "needs one to build prompts — add it to the model folder")
    meta = llm_metadata_pb2.LlmMetadata()
    bos = json.loads((folder / "config.json").read_text()).get("bos_token_id")
    if config.get("add_bos_token") and bos is not None:  # the engine prepends it, as the HF tokenizer does
        meta.start_token.token_ids.ids.append(int(bos))
    for eos in eos_ids(folder):
        meta.stop_tokens.add().token_ids.ids.append(int(eos))
    meta.jinja_prompt_template = template.replace(CONTENT, CONTENT_TEXT)
    meta.max_num_tokens = context_length
    meta.llm_model_type.generic_model.SetInParent()
    return meta


def build(model_path: Path, source: Source, context_length: int, dest: Path) -> Path:
    """litert-lm-builder: the .tflite, tokenizer.json and LlmMetadata into one .litertlm."""
    from litert_lm_builder import litertlm_builder as builder

    tokenizer = source.path / "tokenizer.json"
    if not tokenizer.is_file():
        raise EdgepackError(f"{source.path}: no tokenizer.json; LiteRT-LM bundles the HF tokenizer — add it")
    meta_path = model_path.with_suffix(".llm_metadata.pb")
    meta_path.write_bytes(llm_metadata(source, context_length).SerializeToString())
    bundle = builder.LitertLmFileBuilder()
    bundle.add_system_metadata(builder.Metadata(key="Authors", value="edgepack", dtype=builder.DType.STRING))
    bundle.add_llm_metadata(str(meta_path))
    bundle.add_tflite_model(str(model_path), builder.TfLiteModelType.PREFILL_DECODE)
    bundle.add_hf_tokenizer(str(tokenizer))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as stream:
        bundle.build(stream)
    return dest


@register
class LitertLmExporter(tflite.TfliteExporter):
    """The tflite exporter's conversions (made once, plain and OffsetLinear) with LiteRT-LM's signatures."""

    format = "litertlm"
    version = "2"  # 2: litert-torch's lightweight conversion (tflite.convert_signatures)

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("litert_torch", "ai_edge_quantizer", "litert_lm_builder")

    @classmethod
    def notes(cls) -> str:
        return (f"LiteRT-LM bundle: prefill_{PREFILL_LENGTH} + decode with kv_cache_* in and out, HF tokenizer, "
                "LlmMetadata (generic_model); int8 / int4 as the tflite recipes")

    @staticmethod
    def _convert(model, path: Path) -> Path:
        return convert(model, path)

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        if variant not in VARIANTS:
            raise EdgepackError(f"litertlm: unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
        bits = VARIANTS[variant]
        fp32 = self._converted(source, target, offsets=bits == "int4")
        files = {v: file_name(source.slug, b) for v, b in VARIANTS.items()}
        write_json(out / FOLDER / MODEL_INFO, litertlm_info(self._cfg, PREFILL_LENGTH, files))
        if bits != "fp32":
            fp32 = tflite.quantize(fp32, tflite.recipe(bits), self._work / f"{bits}.tflite")
        return [build(fp32, source, target.context_length, out / FOLDER / files[variant])]
