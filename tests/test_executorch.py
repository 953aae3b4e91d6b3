"""android and ios, ExecuTorch part: .pte programs lowered to XNNPACK in ExecuTorch's LLM interface, run by
executorch's own runtime (executorch.runtime), on every family and on the default model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.artifacts import Artifact, artifacts_in
from edgepack.errors import EdgepackError
from edgepack.exporters.executorch import FILE_NAMES, FOLDER, MAX_SEQ_LEN
from edgepack.runtime import open_runner
from edgepack.runtime.parity import measure, trace_reference
from edgepack.runtime.reference import source_artifact
from edgepack.targets import load_targets

from conftest import FAMILY_KINDS

FRANCE = "What is the capital of France?"


def cli(*args, out: Path, timeout=1800):
    return subprocess.run([sys.executable, "-m", "edgepack", *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout)


def _export(source, target: str, variants: list[str], out: Path) -> dict[str, Artifact]:
    from edgepack.exporters import export_target

    export_target(source, load_targets().targets[target], {"executorch": variants}, out / source.slug, force=False,
                  log=lambda _: None)
    return {a.variant: a for a in artifacts_in(out / source.slug) if a.target == target}


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def tiny_pte(request, tiny_models, tmp_path_factory):
    from edgepack.source import resolve

    source = resolve(str(tiny_models[request.param]))
    out = tmp_path_factory.mktemp(f"pte-{request.param}")
    return source, out, _export(source, "android", ["pte-fp32"], out)


def test_the_program_follows_the_reference_on_every_family(tiny_pte):
    """fp32 through torch.export, XNNPACK and the llama:: custom ops equals the reference decoder (rope scaling,
    partial rotary, qk norms, Gemma's sliding windows and tanh-GELU), prompts longer than one chunk included."""
    source, _, found = tiny_pte
    ref = trace_reference(open_runner(source_artifact(source)), max_new_tokens=16)
    runner = open_runner(found["pte-fp32"])
    result = measure(runner, ref)
    assert result["max_abs_logit"] < 1e-3 and result["greedy"] == 1.0, result
    long = list(range(5, 5 + MAX_SEQ_LEN + 40))  # two chunks
    ref_runner = open_runner(source_artifact(source))
    assert abs(runner.prefill(long) - ref_runner.prefill(long)).max() < 1e-3


def test_the_program_is_what_executorch_llm_runners_load(tiny_pte):
    """One forward method with a dynamic token count and the constant methods the LLM runners read, delegated to
    XNNPACK; model_info.json and tokenizer.json beside it."""
    from edgepack.runtime.executorch import load_program

    source, _, found = tiny_pte
    artifact = found["pte-fp32"]
    program = load_program(artifact.files[0])
    constant = lambda name: program.load_method(name).execute([])[0]  # noqa: E731
    config = json.loads((source.path / "config.json").read_text())
    assert constant("get_max_seq_len") == MAX_SEQ_LEN and constant("get_max_context_len") == 2048
    assert constant("get_vocab_size") == config["vocab_size"] and constant("use_kv_cache") is True
    assert constant("enable_dynamic_shape") is True and constant("get_n_layers") == config["num_hidden_layers"]
    assert list(program.load_method("get_eos_ids").execute([])) == [2]
    assert b"XnnpackBackend" in artifact.files[0].read_bytes()
    folder = artifact.dir / FOLDER
    info = json.loads((folder / "model_info.json").read_text())
    assert info["format"] == "executorch" and info["max_seq_len"] == MAX_SEQ_LEN and info["eos_token_ids"] == [2]
    assert info["files"] == FILE_NAMES and (folder / "tokenizer.json").is_file()


def test_8da4w_lowers_torchaos_quantized_model_and_is_shared_by_ios(tiny_models, tmp_path):
    """8da4w: the lowered program computes what torchao's quantized model computes in eager PyTorch (up to XNNPACK's
    rounding of the int8 activations; measured 0.8 % of the logit spread on the tiny llama), and is a third of fp32's
    size. A random tiny model's int4 fidelity to the reference means little (near-ties); the default model's bars
    are below. The ios target links the same file instead of lowering again."""
    import torch

    from edgepack.exporters.executorch import LlmProgram, quantize_8da4w
    from edgepack.model.weights import load_decoder
    from edgepack.source import resolve

    source = resolve(str(tiny_models["llama"]))
    found = _export(source, "android", ["pte-fp32", "pte-8da4w"], tmp_path)
    fp32, q4 = found["pte-fp32"].files[0], found["pte-8da4w"].files[0]
    assert q4.stat().st_size < 0.6 * fp32.stat().st_size, (q4.stat().st_size, fp32.stat().st_size)
    eager = LlmProgram(quantize_8da4w(load_decoder(source.path, 2048))).eval()
    ids = list(range(5, 45))
    with torch.no_grad():
        expected = eager(torch.tensor([ids]), torch.tensor([0]))[0].numpy()
    got = open_runner(found["pte-8da4w"]).prefill(ids)
    assert abs(got - expected).max() < 0.02 * float(np.ptp(expected)), (abs(got - expected).max(), np.ptp(expected))
    ios = _export(source, "ios", ["pte-8da4w"], tmp_path)
    assert os.path.samefile(ios["pte-8da4w"].files[0], q4) or ios["pte-8da4w"].files[0].read_bytes() == q4.read_bytes()


def test_a_context_shorter_than_a_chunk_exports_and_runs(tiny_models, tmp_path):
    """A target whose context_length is below MAX_SEQ_LEN (a user's targets file, e.g. 64): the program's chunk is
    the context (torch.export refused the wider range: "Constraints violated (tokens)", an internal error), and it
    still computes what the reference computes."""
    import dataclasses

    from edgepack.exporters import export_target
    from edgepack.runtime.executorch import load_program
    from edgepack.source import resolve

    source = resolve(str(tiny_models["llama"]))
    target = dataclasses.replace(load_targets().targets["android"], context_length=64)
    export_target(source, target, {"executorch": ["pte-fp32"]}, tmp_path / source.slug, force=False, log=lambda _: None)
    artifact = next(a for a in artifacts_in(tmp_path / source.slug) if a.variant == "pte-fp32")
    program = load_program(artifact.files[0])
    assert program.load_method("get_max_seq_len").execute([])[0] == 64
    assert program.load_method("get_max_context_len").execute([])[0] == 64
    ids = list(range(5, 45))
    got = open_runner(artifact).prefill(ids)
    assert abs(got - open_runner(source_artifact(source)).prefill(ids)).max() < 1e-3


def test_a_corrupt_program_is_one_error_line(tiny_pte, tmp_path):
    source, out, found = tiny_pte
    copy = tmp_path / "android"
    shutil.copytree(found["pte-fp32"].dir, copy)
    model = copy / FOLDER / FILE_NAMES["pte-fp32"]
    model.write_bytes(model.read_bytes()[:4000])
    with pytest.raises(EdgepackError, match="ExecuTorch cannot load this program"):
        open_runner(Artifact("android", "executorch", "pte-fp32", copy, (model,)))


def test_context_overflow_is_one_error(tiny_pte):
    _, _, found = tiny_pte
    with pytest.raises(EdgepackError, match="exceed the context length 2048"):
        open_runner(found["pte-fp32"]).prefill([5] * 2049)


# --- the default model (default_dist: its android target, exported once in conftest.py, plus pte-8da4w) ------------
@pytest.mark.slow  # lowering the default model's 8da4w program takes 7.5 min: `make test-all`
def test_default_model_8da4w_meets_the_bar_answers_and_bundles(default_source, default_dist):
    from edgepack.mobile import verify_bundle

    exported = cli("export", "--target", "android", "--variant", "pte-8da4w", out=default_dist)  # kept beside the rest
    assert exported.returncode == 0, exported.stderr

    validated = cli("validate", "--target", "android", "--variant", "pte-8da4w", "--json", out=default_dist)
    assert validated.returncode == 0, validated.stdout + validated.stderr  # targets.toml's bars
    q4 = {r["key"]: r["metrics"] for r in json.loads(validated.stdout)}["android/executorch/pte-8da4w"]
    assert q4["top1"] >= 0.865, q4  # the floor: llama.cpp Q4_K_M's on the same prompts
    answer = cli("run", "--target", "android", "--variant", "pte-8da4w", "--prompt", FRANCE, out=default_dist)
    assert "Paris" in answer.stdout, answer.stdout + answer.stderr
    built = cli("bundle", "--platform", "android", out=default_dist)
    assert built.returncode == 0, built.stderr
    bundle = default_dist / default_source.slug / "bundles" / "android"
    for name in ("model_8da4w.pte", "tokenizer.json", "model_info.json"):
        assert (bundle / "src/main/assets" / FOLDER / name).is_file(), name
    assert "LlmModule" in (bundle / "README.md").read_text() and verify_bundle(bundle) == []
