"""`pytest --edgepack-dist`: one test per target × variant × check, thresholds from the targets file, JUnit XML."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("llama_cpp", reason="the gate is exercised on cpu artifacts, which need llama-cpp-python")

from edgepack.exporters import export_target  # noqa: E402
from edgepack.source import resolve  # noqa: E402
from edgepack.targets import load_targets  # noqa: E402

TARGETS = """
[cpu.gguf]
variants = ["F16", "Q2_K"]
[cpu.gguf.thresholds]
F16 = { max_kl = 1e-3, min_top1 = 0.99 }
Q2_K = { min_top1 = 0.999 }
"""


def test_the_plugin_gates_each_variant_and_check(tiny_llama, tmp_path):
    targets_file = tmp_path / "targets.toml"
    targets_file.write_text(TARGETS)
    source = resolve(str(tiny_llama))
    export_target(source, load_targets(targets_file).targets["cpu"], {"gguf": ["F16", "Q2_K"]}, tmp_path / "dist" /
                  source.slug, force=False, log=lambda *_: None)
    junit = tmp_path / "parity.xml"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "--edgepack-dist", str(tmp_path / "dist" / source.slug), "--edgepack-targets", str(targets_file),
         "--junitxml", str(junit), "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "1 failed, 2 passed" in out.stdout, out.stdout + out.stderr
    assert "cpu/gguf/Q2_K: top1 =" in out.stdout and "needs >= 0.999" in out.stdout
    cases = {c.get("name"): c.find("failure") is not None for c in ET.parse(junit).iter("testcase")}
    assert cases == {"cpu/gguf/F16[max_kl]": False, "cpu/gguf/F16[min_top1]": False, "cpu/gguf/Q2_K[min_top1]": True}
