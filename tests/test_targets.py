"""targets.toml: the shipped matrix loads; every kind of mistake names the file, the key and the valid choices."""

from __future__ import annotations

import pytest

from edgepack.errors import EdgepackError
from edgepack.targets import load_targets


def test_the_shipped_targets_file_has_the_default_matrix():
    targets = load_targets()
    assert list(targets.targets) == ["web", "ios", "android", "cpu", "mac"]
    assert targets.targets["web"].formats["onnx"].variants == ("q4", "q4dq", "int8", "q4f16", "fp16", "q8", "fp32")
    assert targets.targets["web"].execution_providers == ("webgpu", "wasm")
    assert targets.targets["ios"].formats["coreml"].variants == ("fp16", "int4")
    assert set(targets.targets["android"].formats) == {"tflite", "litertlm", "onnx-mobile", "executorch"}
    assert targets.targets["android"].formats["litertlm"].variants == ("litertlm-int8", "litertlm-int4")
    assert targets.thresholds("litertlm", "litertlm-int8", "android")["min_engine_greedy"] == 1.0
    for name in ("android", "ios"):  # the same .pte files in both, each target with its table
        assert targets.targets[name].formats["executorch"].variants == ("pte-8da4w", "pte-fp32")
        assert targets.thresholds("executorch", "pte-fp32", name) == {"max_abs_logit": 1e-3, "min_greedy": 1.0}
    assert targets.targets["cpu"].formats["gguf"].variants == ("F16", "Q8_0", "Q5_K_S", "Q4_K_M", "Q4_0", "Q2_K")
    assert targets.targets["cpu"].formats["gguf"].thresholds["F16"]["min_top1"] == 0.999
    assert targets.targets["mac"].formats["mlx"].variants == ("fp16", "q8", "q4")


@pytest.mark.parametrize("text, message", [
    ('[cpu.gguf]\nvariants = ["F16"]\nvarients = 1\n', "unknown key 'cpu.gguf.varients'; valid: runner, thresholds, variants"),
    ('[desktop.gguf]\nvariants = ["F16"]\n', "unknown key 'desktop'; valid: web, ios, android, cpu, mac"),
    ('[cpu.gguf]\nvariants = ["Q4_K_XL"]\n', "unknown variant 'cpu.gguf.variants: Q4_K_XL'; valid: F32, F16"),
    ('[cpu.onnx]\nvariants = ["q4"]\n', "format 'onnx' belongs to target 'web', not 'cpu'"),
    ('[cpu.executorch]\nvariants = ["pte-fp32"]\n', "format 'executorch' belongs to target 'android or ios', not 'cpu'"),
    ('[cpu.gguf]\nvariants = ["F16"]\nrunner = "onnxruntime"\n', "unknown runner"),
    ('[cpu.gguf]\nvariants = ["F16"]\n[cpu.gguf.thresholds]\nF16 = { min_top = 0.9 }\n', "unknown key 'cpu.gguf.thresholds.F16.min_top'"),
    ('[cpu.gguf]\nvariants = ["F16"]\n[cpu.gguf.thresholds]\nF16 = { min_top1 = "high" }\n', "must be a number"),
    ('[cpu]\ncontext_length = 4\n[cpu.gguf]\nvariants = ["F16"]\n', "context_length' must be an integer"),
    ('[cpu]\ncontext_length = 512\n', "target 'cpu' names no format; valid: gguf"),
    ('[web.onnx\n', "not valid TOML"),
])
def test_mistakes_in_a_targets_file_are_named(tmp_path, text, message):
    path = tmp_path / "targets.toml"
    path.write_text(text)
    with pytest.raises(EdgepackError) as info:
        load_targets(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_missing_targets_file_says_so(tmp_path):
    with pytest.raises(EdgepackError, match="targets file not found"):
        load_targets(tmp_path / "none.toml")


def test_selecting_an_unlisted_target_names_the_listed_ones(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[cpu.gguf]\nvariants = ["F16"]\n')
    targets = load_targets(path)
    assert [t.name for t in targets.select(["all"])] == ["cpu"]
    with pytest.raises(EdgepackError, match="no target 'web'; targets in this file: cpu"):
        targets.select(["web"])
