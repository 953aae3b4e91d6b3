"""The command line as a user meets it: answers, one-line errors, doctor, skipped targets, bundles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgepack.cli import main
from edgepack.mobile import verify_bundle


def edgepack(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_run_on_the_source_answers_paris(default_source):
    out = edgepack("run", "--target", "source", "--prompt", "What is the capital of France?", "--max-new-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert out.stdout.strip().startswith("The capital")  # only the generated text


def test_doctor_lists_every_target_with_its_state(capsys):
    assert main(["doctor", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["target"] for r in rows} == {"source", "web", "ios", "android", "cpu"}
    assert all(r["exporter"] and r["runner"] for r in rows)
    assert next(r for r in rows if r["target"] == "source")["runner"] == "ready"


@pytest.mark.parametrize("args, message", [
    (["export", "--model", "/nonexistent/model"], "no such file or folder"),
    (["validate", "--model", "/nonexistent/model.gguf"], "no such file"),
    (["export", "--targets", "/nonexistent.toml"], "targets file not found"),
    (["run", "--target", "cpu", "--model", "{tiny}", "--prompt", "hi"], "no exported cpu artifact"),
    (["export", "--model", "{tiny}", "--target", "cpu", "--variant", "Q9_9"], "--variant Q9_9: not a variant of cpu"),
    (["bundle", "--verify", "/nonexistent"], "not an edgepack bundle"),
])
def test_bad_input_is_one_error_line_and_a_nonzero_exit(tiny_llama, tmp_path, args, message):
    args = [a.replace("{tiny}", str(tiny_llama)) for a in args]
    out = edgepack(*args, "--out", str(tmp_path)) if args[0] not in ("bundle",) else edgepack(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepack: error:") and message in lines[0], out.stderr


def test_targets_without_an_exporter_are_skipped_with_a_message(tiny_llama, tmp_path):
    from edgepack.exporters import EXPORTERS

    missing = [f for f in ("onnx", "coreml", "tflite", "onnx-mobile", "gguf") if f not in EXPORTERS]
    out = edgepack("export", "--model", str(tiny_llama), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for fmt in missing:
        assert f"{fmt} exporter not available yet (skipped)" in out.stderr


def test_a_bundle_verifies_and_reports_tampering(tmp_path, tiny_llama):
    from edgepack.artifacts import write_json
    from edgepack.mobile import build_bundle
    from edgepack.source import resolve

    source = resolve(str(tiny_llama))
    target = tmp_path / source.slug / "android"
    target.mkdir(parents=True)
    (target / "model_int8.tflite").write_bytes(b"\x00" * 64)
    write_json(target / "manifest.json", {"target": "android", "artifacts": []})
    archive = build_bundle("android", source, tmp_path)
    bundle = tmp_path / source.slug / "bundles" / "android"
    assert archive.is_file() and verify_bundle(bundle) == []
    (bundle / "src/main/assets/model_int8.tflite").write_bytes(b"\x01" * 64)
    (bundle / "extra.txt").write_text("x")
    assert verify_bundle(bundle) == ["sha256 mismatch: src/main/assets/model_int8.tflite", "not in manifest: extra.txt"]
