"""cpu target: GGUF converted by llama.cpp's own convert_hf_to_gguf.py, quantized by llama.cpp's own quantizer (llama_model_quantize)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register
from edgepack.native import cpu_threads, llama_cpp_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import FORMATS, TargetSpec
from edgepack.tools import llama_build_missing, llama_convert_dir, llama_tools

# Types of at most 5 bits get an importance matrix from the calibration text the package ships; above that
# the plain quantizer already loses little (Q8_0 KL 0.005 on the default model).
IMATRIX_VARIANTS = ("Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")
IMATRIX_FILE = "imatrix.gguf"

# llama.cpp's pre-tokenizer names, recognized by the pre-tokenizer a Hugging Face tokenizer.json declares.
# Regexes are the originals from the model families' tokenizer.json files (llama.cpp's llama-vocab.cpp
# quotes them beside its adapted versions).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def gguf_file_name(source: Source, variant: str) -> str:
    return f"{source.slug}-{variant}.gguf"


def pre_tokenizer_name(tok: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read from its structure, or None.

    llama.cpp's converter recognizes a pre-tokenizer by hashing the token ids of a test string, so a tokenizer
    with a known pre-tokenizer but its own vocabulary (a retrained or extended one) is refused there; this is the
    fallback edgepack hands it for such tokenizers only.
    """
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        return {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}.get(regex)
    return None


# Runs llama.cpp's converter unchanged, except that a byte-level BPE tokenizer whose test-string hash it does not
# know gets the pre-tokenizer edgepack read from its structure (argv[5]; empty: keep the converter's refusal).
_CONVERT_DRIVER = """
import runpy, sys
script_dir, model, outtype, outfile, fallback = sys.argv[1:6]
sys.path[:0] = [script_dir, script_dir + "/gguf-py"]
from conversion import base
recognized = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognized(self, tokenizer)
    except NotImplementedError:
        if not fallback:
            raise
        return fallback
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script_dir + "/convert_hf_to_gguf.py", model, "--outtype", outtype, "--outfile", outfile]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_base_gguf(source: Source, path: Path, outtype: str) -> None:
    """The whole model as an F32 or F16 GGUF, written by llama.cpp's own convert_hf_to_gguf.py (every family
    llama.cpp knows, SentencePiece and BPE tokenizers, its tensor layouts and metadata)."""
    tok_file = source.path / "tokenizer.json"
    tok = json.loads(tok_file.read_text(encoding="utf-8")) if tok_file.is_file() else {}
    fallback = pre_tokenizer_name(tok) if tok.get("model", {}).get("type") == "BPE" else None
    done = subprocess.run([sys.executable, "-c", _CONVERT_DRIVER, str(llama_convert_dir()), str(source.path),
                           outtype.lower(), str(path), fallback or ""], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        if any("pre-tokenizer was not recognized" in line for line in lines):
            raise EdgepackError(f"{tok_file}: llama.cpp's converter does not know this tokenizer's pre-tokenizer and "
                                "edgepack recognizes no llama.cpp equivalent: GGUF cannot express this tokenizer "
                                "(supported: SentencePiece, and GPT-2, SmolLM, Llama 3, Qwen2 byte-level BPE)")
        if any("No space left" in line or "File too large" in line for line in lines):
            raise OSError(28, "no space left writing " + path.name)
        raise EdgepackError(f"llama.cpp's convert_hf_to_gguf.py failed on {source.path} ({lines[-1][:200]})")
    import gguf

    arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
    if arch != source.family.gguf_arch:
        raise EdgepackError(f"llama.cpp's converter wrote a '{arch}' GGUF for a {source.family.name} model "
                            f"(expected '{source.family.gguf_arch}'); edgepack's runner would not match it")


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
    params.nthread = cpu_threads()
    with quiet_stderr():
        status = llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not out.is_file():
        raise EdgepackError(f"llama.cpp's quantizer failed for {variant} (status {status}) writing {out}; "
                            "check free disk space")


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
                   "-t", cpu_threads()], "llama-imatrix")


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
        if llama_tools(build=False) is None and llama_build_missing():
            return f"llama-imatrix/llama-quantize cannot be built ({llama_build_missing()}): ≤5-bit variants without imatrix"
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
        _run_tool([tools["llama-quantize"], "--imatrix", imatrix, base, path, variant, cpu_threads()],
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
