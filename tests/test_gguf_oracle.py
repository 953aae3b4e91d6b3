"""The cpu target against llama.cpp's own toolchain: the plain convert_hf_to_gguf.py command (from the
llama-cpp-python sdist on PyPI; edgepack runs the same script for its base file) and llama-quantize give the same
tensors and tokenizer as edgepack's export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the cpu target needs llama-cpp-python (make install builds it)")

from edgepack.exporters import export_target  # noqa: E402
from edgepack.exporters.gguf import gguf_file_name, quantize  # noqa: E402
from edgepack.tools import CONVERT_SCRIPT, llama_convert_dir  # noqa: E402
from edgepack.targets import load_targets  # noqa: E402


@pytest.fixture(scope="session")
def convert_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the sdist of the installed llama-cpp-python, run here as is."""
    return llama_convert_dir() / CONVERT_SCRIPT


def _tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def _tokenizer_fields(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: fields[k].contents() for k in fields if k.startswith("tokenizer.")}


def test_tensors_and_tokenizer_equal_llama_cpps_own_converter_and_quantizer(default_source, convert_script, tmp_path):
    oracle_f16 = tmp_path / "oracle-F16.gguf"
    subprocess.run([sys.executable, str(convert_script), str(default_source.path), "--outtype", "f16",
                    "--outfile", str(oracle_f16)], check=True, capture_output=True, timeout=600)
    cpu = load_targets().targets["cpu"]
    folder = export_target(default_source, cpu, {"gguf": ["F16", "Q4_K_M"]}, tmp_path / "dist", force=False,
                           log=lambda *_: None)
    ours_f16 = folder / gguf_file_name(default_source, "F16")
    assert _tensors(ours_f16) == _tensors(oracle_f16)
    assert _tokenizer_fields(ours_f16) == _tokenizer_fields(oracle_f16)

    oracle_q = tmp_path / "oracle-Q4_K_M.gguf"
    quantize(oracle_f16, oracle_q, "Q4_K_M")
    shipped = folder / gguf_file_name(default_source, "Q4_K_M")
    plain = folder / "baseline" / shipped.name
    assert _tensors(plain) == _tensors(oracle_q)  # the plain build is llama.cpp's own toolchain, exactly
    assert (folder / "imatrix.gguf").is_file()
    assert _tensors(shipped) != _tensors(oracle_q)  # the shipped one is quantized with the importance matrix
