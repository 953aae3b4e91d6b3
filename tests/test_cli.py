"""The command line as a user meets it: answers, one-line errors, doctor, skipped targets, bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.cli import main
from edgepack.mobile import verify_bundle

from conftest import PLAIN_TARGETS


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
    answer = json.loads(capsys.readouterr().out)
    rows = answer["formats"]
    assert {t for r in rows for t in r["target"].split()} == {"source", "web", "ios", "android", "cpu", "mac"}
    assert next(r for r in rows if r["format"] == "executorch")["target"] == "android ios"
    # with the README's setup every exporter and runner is ready here (the source has no exporter)
    assert all(r["runner"] == "ready" and r["exporter"] in ("ready", "\u2014") for r in rows), rows
    # and make install built every helper tool into the cache
    assert len(answer["tools"]) == 4 and all(Path(t["where"]).exists() for t in answer["tools"]), answer["tools"]


def test_targets_write_gives_the_default_matrix_to_edit(tmp_path, capsys):
    from edgepack.targets import DEFAULT_TARGETS_FILE, load_targets

    out = tmp_path / "mine.toml"
    assert main(["targets", "--write", str(out)]) == 0
    assert out.read_text() == DEFAULT_TARGETS_FILE.read_text()
    assert main(["targets", "--write", str(out)]) == 2  # no silent overwrite
    assert "pass --force" in capsys.readouterr().err
    out.write_text(out.read_text().replace('"Q4_K_M", ', ""))
    assert "Q4_K_M" not in load_targets(out).targets["cpu"].formats["gguf"].variants


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


def test_targets_without_an_exporter_are_skipped_with_a_message(tiny_llama, tmp_path, monkeypatch, capsys):
    from edgepack.exporters import EXPORTERS
    from edgepack.targets import FORMATS

    assert set(FORMATS) <= set(EXPORTERS)  # every format has its exporter today
    monkeypatch.delitem(EXPORTERS, "coreml")  # as a format without one would be
    targets = tmp_path / "targets.toml"
    targets.write_text('[ios]\ncontext_length = 64\n[ios.coreml]\nrunner = "coreml"\nvariants = ["fp16"]\n'
                       '[cpu]\ncontext_length = 64\n[cpu.gguf]\nrunner = "llama.cpp"\nvariants = ["F16"]\n')
    assert main(["export", "--model", str(tiny_llama), "--targets", str(targets), "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr()
    assert "coreml exporter not available yet (skipped)" in out.out + out.err
    assert list((tmp_path / "d").rglob("*.gguf")) and not list((tmp_path / "d").rglob("*.mlpackage"))


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


# gemma3 (six layers) takes about 5 min of a make test worker; its every-target export is make test-all's, and
# each target's own tests hold gemma3 (sliding windows included) in make test
@pytest.mark.parametrize("kind", ["phi3", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_a_new_family_exports_to_every_target_validates_and_chats_on_cpu(tiny_models, tmp_path, kind):
    """gemma3's parity prompts are all longer than its 8-token window: every target's sliding layers are used."""
    targets = tmp_path / "targets.toml"
    targets.write_text(PLAIN_TARGETS)
    model = str(tiny_models[kind])
    common = ("--model", model, "--targets", str(targets), "--out", str(tmp_path / "dist"))
    exported = edgepack("export", "--target", "all", *common)
    assert exported.returncode == 0, exported.stderr
    validated = edgepack("validate", *common)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    for target in ("web/onnx/fp32", "ios/coreml/fp16", "android/tflite/fp32", "cpu/gguf/F16", "mac/mlx/fp16"):
        assert f"{target}: " in validated.stdout + validated.stderr
    ran = edgepack("run", "--target", "cpu", "--variant", "F16", "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "8", *common)
    assert ran.returncode == 0 and len(ran.stdout) > 1, ran.stderr  # a random model may stream whitespace only


@pytest.mark.parametrize("kind, change, feature", [
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("phi3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
])
def test_an_unsupported_feature_is_one_error_naming_it_and_nothing_is_written(tiny_models, tmp_path, kind, change,
                                                                              feature):
    import shutil

    folder = tmp_path / f"odd-{kind}"
    shutil.copytree(tiny_models[kind], folder)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    out = edgepack("export", "--model", str(folder), "--target", "all", "--out", str(tmp_path / "dist"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and feature in lines[0], out.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").rglob("*.*"))


def test_each_format_of_a_target_is_exported_in_a_process_of_its_own(tiny_llama, tmp_path, capsys):
    """Two formats to build: each runs in a spawned process (what one converter leaves resident cannot stack under
    the next one's peak; the 494M whole android target: 8.80 GB in one process). The children's progress comes
    through as it happens, the manifest lists both, and a child killed mid-export is one error line with nothing
    left behind."""
    targets = tmp_path / "targets.toml"
    ios = ('[ios]\ncontext_length = 2048\n[ios.coreml]\nrunner = "coreml"\nvariants = ["fp16"]\n'
           '[ios.executorch]\nrunner = "executorch"\nvariants = ["{pte}"]\n')
    targets.write_text(ios.format(pte="pte-fp32"))
    common = ["--model", str(tiny_llama), "--targets", str(targets), "--target", "ios"]
    assert main(["export", *common, "--out", str(tmp_path / "d")]) == 0
    lines = [line.strip() for line in capsys.readouterr().err.splitlines() if line.strip().startswith("ios: ")]
    assert [line.split(" written in ")[0] for line in lines] == [
        "ios: exporting coreml fp16…", "ios: coreml fp16", "ios: exporting executorch pte-fp32…",
        "ios: executorch pte-fp32"], lines
    (folder,) = (tmp_path / "d").glob("*/ios")
    manifest = json.loads((folder / "manifest.json").read_text())
    built = [(a["format"], a["variant"]) for a in manifest["artifacts"]]
    assert built == [("coreml", "fp16"), ("executorch", "pte-fp32")]
    assert all((folder / f["path"]).is_file() for a in manifest["artifacts"] for f in a["files"])

    # a child killed (as the kernel's OOM killer would) while it converts: one line, exit 2, no folder
    import psutil

    cli = subprocess.Popen([sys.executable, "-m", "edgepack", "export", *common, "--out", str(tmp_path / "e")],
                           stderr=subprocess.PIPE, text=True)
    for line in cli.stderr:
        if "exporting executorch" in line:
            break
    for child in psutil.Process(cli.pid).children():
        child.kill()
    err = [line for line in cli.stderr.read().splitlines() if line.startswith("edgepack")]
    assert cli.wait(timeout=120) == 2
    assert len(err) == 1 and "the executorch export's process died" in err[0], err
    assert not list((tmp_path / "e").glob("*/ios")) and not list((tmp_path / "e").glob("*/.tmp-*"))


def test_a_child_process_that_dies_is_one_line_naming_memory_or_a_full_disk(tmp_path, monkeypatch):
    """A child that vanishes (an OOM kill, or a SIGBUS writing a memory-mapped file on a full disk: CI once quantized
    a .tflite onto a full disk and was told "out of memory?") is one line that names the likelier cause."""
    import os

    from edgepack import errors

    monkeypatch.setattr(errors, "FULL_DISK_BYTES", 0)
    with pytest.raises(errors.EdgepackError, match=r"^x: its process died \(killed: out of memory\?\); free memory"):
        errors.in_child(os._exit, 3, process="x: its process", disk=tmp_path / "out", again="try again")
    monkeypatch.setattr(errors, "FULL_DISK_BYTES", 1 << 62)
    with pytest.raises(errors.EdgepackError, match=r"^x: its process died \(\d+ MB free on the disk holding .*/out: full "
                                                   r"disk\?\); free disk space there and try again$"):
        errors.in_child(os._exit, 3, process="x: its process", disk=tmp_path / "out", again="try again")
    assert errors.in_child(os.path.join, "a", "b", process="x", disk=tmp_path, again="") == "a/b"


def test_a_large_models_artifacts_are_validated_each_in_a_process_of_its_own(tiny_llama, tmp_path, capsys, monkeypatch):
    """From ISOLATE_VALIDATE_PARAMETERS up (here lowered to 0), validate runs each artifact in a spawned process
    that reads the reference from its cached trace (the 1.24B android target validated in one process reached
    20.6 GB): the same verdicts and metrics as in one process."""
    import edgepack.cli as cli

    common = ["--model", str(tiny_llama), "--target", "mac", "--out", str(tmp_path / "d")]
    assert main(["export", *common, "--variant", "fp16", "q4"]) == 0
    capsys.readouterr()
    main(["validate", *common, "--json"])
    together = json.loads(capsys.readouterr().out.split("\nthreshold missed")[0])
    monkeypatch.setattr(cli, "ISOLATE_VALIDATE_PARAMETERS", 0)
    main(["validate", *common, "--json"])
    apart = json.loads(capsys.readouterr().out.split("\nthreshold missed")[0])
    assert [r["key"] for r in apart] == [r["key"] for r in together] == ["mac/mlx/fp16", "mac/mlx/q4"]
    for one, other in zip(apart, together):
        assert one["checks"] == other["checks"] and one["metrics"]["kl"] == pytest.approx(other["metrics"]["kl"])
