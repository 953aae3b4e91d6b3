"""cpu target: GGUF written with gguf-py's GGUFWriter, quantized by llama.cpp's own quantizer (llama_model_quantize)."""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register
from edgepack.model.weights import read_hf_weights
from edgepack.native import llama_cpp_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import FORMATS, TargetSpec

# Types of at most 5 bits get an importance matrix from the calibration text the package ships; above that
# the plain quantizer already loses little (Q8_0 KL 0.005 on the default model).
IMATRIX_VARIANTS = ("Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")
IMATRIX_FILE = "imatrix.gguf"
GGUF_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}  # family -> gguf.MODEL_ARCH member

# llama.cpp's pre-tokenizer names, recognized by the pre-tokenizer a Hugging Face tokenizer.json declares.
# Regexes are the originals from the model families' tokenizer.json files (llama.cpp's llama-vocab.cpp
# quotes them beside its adapted versions).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def gguf_file_name(source: Source, variant: str) -> str:
    return f"{source.slug}-{variant}.gguf"


def pre_tokenizer_name(tok: dict, where: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, or one clear error."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise EdgepackError(f"{where}: pre-tokenizer {kinds} has no llama.cpp equivalent edgepack knows; "
                        "GGUF cannot express this tokenizer (supported: GPT-2, SmolLM, Llama 3, Qwen2 byte-level BPE)")


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    """rope_freqs for Llama 3's long-context scaling, as llama.cpp expects them (1 / scale per frequency)."""
    scaling = config["rope_scaling"]
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (config.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _permute_for_llama_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order → llama.cpp's interleaved-pair order for Q/K projections (llama arch only)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_base_gguf(source: Source, path: Path, outtype: str) -> None:
    """Write the whole model as an F32 or F16 GGUF: metadata, tokenizer, and every tensor under llama.cpp's names.

    Tensor types follow llama.cpp's converter: 1-D tensors and norms in F32, matrices in `outtype`.
    """
    import gguf

    config = source.config
    family = source.family
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family.name])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"]
    tok_file = source.path / "tokenizer.json"
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    if tok["model"]["type"] != "BPE" or tok["model"].get("byte_fallback"):
        raise EdgepackError(f"{tok_file}: a {tok['model']['type']} tokenizer"
                            f"{' with byte fallback (SentencePiece-style)' if tok['model'].get('byte_fallback') else ''}"
                            " is not supported by the gguf exporter yet; only byte-level BPE tokenizers are")
    pre = pre_tokenizer_name(tok, tok_file)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.slug)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Tokenizer: every id up to the model's vocab size, with llama.cpp's token types.
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_file)).get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    specials = {t["id"]: t.get("special", False) for t in tok.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(config["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in specials else
                         gguf.TokenType.CONTROL if specials[i] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source.path, load_merges=True, n_vocab=len(tokens))
    special.chat_template = source.tokenizer_config().get("chat_template", special.chat_template)
    special.add_to_gguf(writer)

    # Tensors, named through gguf-py's own HF → GGUF table.
    names = gguf.get_tensor_name_map(arch, layers)
    weights = read_hf_weights(source.path)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          llama3_rope_factors(config, head_dim))
    for hf_name, tensor in weights.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgepackError(f"{source.path}: tensor {hf_name} has no llama.cpp name for {family.name}")
        data = tensor.float().numpy()
        if family.rope_layout == "norm" and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_for_llama_rope(data, heads)
        elif family.rope_layout == "norm" and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_for_llama_rope(data, kv_heads)
        keep_f32 = data.ndim <= 1 or name.endswith("_norm.weight") or outtype == "F32"
        writer.add_tensor(name, data if keep_f32 else data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ftype_for(variant: str) -> int:
    """llama.cpp's file-type enum for a variant name, or an error listing the valid names."""
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if variant == "F32" else f"LLAMA_FTYPE_MOSTLY_{variant}"
    if variant not in FORMATS["gguf"]["variants"] or not hasattr(llama_cpp, name):
        raise EdgepackError(f"gguf variant '{variant}' is not a llama.cpp type; valid: "
                            f"{', '.join(FORMATS['gguf']['variants'])}")
    return getattr(llama_cpp, name)


def quantize(base: Path, out: Path, variant: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), all cores."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(variant)
    params.nthread = os.cpu_count() or 1
    with quiet_stderr():
        status = llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not out.is_file():
        raise EdgepackError(f"llama.cpp's quantizer failed for {variant} (status {status}) writing {out}; "
                            "check free disk space")


def llama_tools() -> dict[str, Path] | None:
    """llama.cpp's llama-imatrix and llama-quantize: $EDGEPACK_LLAMA_TOOLS, the venv's llama.cpp/bin (make
    install builds them there), or PATH; None when either is missing."""
    folders = [os.environ.get("EDGEPACK_LLAMA_TOOLS"), str(Path(sys.prefix) / "llama.cpp" / "bin")]
    tools = {}
    for name in ("llama-imatrix", "llama-quantize"):
        found = next((Path(f) / name for f in folders if f and (Path(f) / name).is_file()), None)
        found = found or (Path(shutil.which(name)) if shutil.which(name) else None)
        if found is None:
            return None
        tools[name] = found
    return tools


def _run_tool(args: list, what: str) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgepackError(f"llama.cpp's {what} failed ({last}); check free disk space")


def compute_imatrix(tools: dict[str, Path], base: Path, out: Path) -> None:
    """llama-imatrix over edgepack's calibration text (chat turns, prose, code, numbers; none of the parity set)."""
    calibration = resources.files("edgepack").joinpath("data/calibration.txt")
    with resources.as_file(calibration) as text:
        _run_tool([tools["llama-imatrix"], "-m", base, "-f", text, "-o", out, "-c", "256",
                   "-t", os.cpu_count() or 1], "llama-imatrix")


@register
class GGUFExporter(Exporter):
    format = "gguf"

    def __init__(self):
        self._base: Path | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        return llama_cpp_missing()

    @classmethod
    def notes(cls) -> str:
        if llama_tools() is None:
            return "llama-imatrix/llama-quantize not found (make install builds them): ≤5-bit variants without imatrix"
        return "≤5-bit variants use an importance matrix (llama-imatrix) from edgepack/data/calibration.txt"

    def write_shared(self, source: Source, out: Path, target: TargetSpec) -> None:
        """Nothing: a GGUF file carries its own tokenizer, chat template and config."""

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        ftype_for(variant)
        path = out / gguf_file_name(source, variant)
        if variant in ("F32", "F16"):
            write_base_gguf(source, path, variant)
            return [path]
        base = self._f16_base(source, out)
        tools = llama_tools()
        if variant not in IMATRIX_VARIANTS or tools is None:
            quantize(base, path, variant)
            return [path]
        # The plain quantization stays beside it under baseline/, so validate can report KL before and after.
        baseline = out / "baseline" / path.name
        baseline.parent.mkdir(exist_ok=True)
        quantize(base, baseline, variant)
        imatrix = out / IMATRIX_FILE
        if not imatrix.is_file():
            compute_imatrix(tools, base, imatrix)
        _run_tool([tools["llama-quantize"], "--imatrix", imatrix, base, path, variant, os.cpu_count() or 1],
                  f"llama-quantize {variant}")
        return [path, baseline]

    def _f16_base(self, source: Source, out: Path) -> Path:
        """llama.cpp's own workflow quantizes from the F16 conversion: the F16 variant when this export wrote
        it, else one temporary F16 file shared by every variant of the export."""
        exported = out / gguf_file_name(source, "F16")
        if exported.is_file():
            return exported
        if self._base is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="edgepack-gguf-base-"))
            self._base = self._tmp / "base-F16.gguf"
            write_base_gguf(source, self._base, "F16")
        return self._base

    def finish(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._base = None
