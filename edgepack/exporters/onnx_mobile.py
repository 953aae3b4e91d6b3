"""android target, ONNX Mobile part: the web target's q4 graph in ORT format for onnxruntime-android.

    android/ort/model_q4.ort                 optimized for ARM ('Fixed' style: what the CPU EP runs)
    android/ort/required_operators.config    the operator list for an ORT minimal build (--include_ops_by_config)

Conversion is onnxruntime's own tool (python -m onnxruntime.tools.convert_onnx_models_to_ort).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.exporters.base import register
from edgepack.exporters.onnx_web import OnnxWebExporter, write_variant
from edgepack.source import Source
from edgepack.targets import TargetSpec

FOLDER = "ort"
OPERATORS_CONFIG = "required_operators.config"


def convert_to_ort(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """onnxruntime's converter on one .onnx: the .ort file and its required-operators config, in out_dir."""
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        result = subprocess.run(
            [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path), "--output_dir", work,
             "--optimization_style", "Fixed", "--target_platform", "arm"],
            capture_output=True, text=True,
        )
        made = sorted(Path(work).glob("*.ort"))
        config = next(Path(work).glob("*.config"), None)
        if result.returncode or not made or config is None:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EdgepackError(f"{onnx_path}: onnxruntime's ORT-format converter failed ({tail[0][:200]})")
        ort_file, config_file = out_dir / onnx_path.with_suffix(".ort").name, out_dir / OPERATORS_CONFIG
        shutil.move(made[0], ort_file)
        lines = config.read_text().splitlines()  # the converter names the temporary path it wrote to
        lines = [f"# - {ort_file.name}" if line.startswith("# - ") else line for line in lines]
        config_file.write_text("\n".join(lines) + "\n")
    return ort_file, config_file


@register
class OnnxMobileExporter(OnnxWebExporter):
    format = "onnx-mobile"
    version = "1"

    @classmethod
    def notes(cls) -> str:
        return "the web q4 graph in ORT format + required-operators config for a minimal build"

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        if variant != "q4":
            raise EdgepackError(f"onnx-mobile: unknown variant '{variant}'; valid: q4")
        folder = out / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as work:
            files = write_variant(self._decoder(source, target), "q4", Path(work))
            return list(convert_to_ort(files[0], folder))
