"""android target, LiteRT-LM part: .litertlm bundles proven in LiteRT-LM's own engine (litert-lm-api)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAMILY_KINDS

pytest.importorskip("litert_lm")
pytest.importorskip("litert_lm_builder")

from edgepack.artifacts import artifacts_in  # noqa: E402
from edgepack.runtime import open_runner  # noqa: E402
from edgepack.runtime.parity import trace_reference, validate_artifact  # noqa: E402
from edgepack.runtime.reference import source_artifact  # noqa: E402

FRANCE = "What is the capital of France?"


def cli(*args, out: Path, timeout=1200):
    return subprocess.run([sys.executable, "-m", "edgepack", *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def tiny_litertlm(request, tiny_models, tmp_path_factory):
    from edgepack.exporters import export_target
    from edgepack.source import resolve
    from edgepack.targets import load_targets

    source = resolve(str(tiny_models[request.param]))
    out = tmp_path_factory.mktemp(f"litertlm-{request.param}")
    export_target(source, load_targets().targets["android"], {"litertlm": ["litertlm-fp32", "litertlm-int8"]},
                  out / source.slug, force=False, log=lambda _: None)
    return source, {a.variant: a for a in artifacts_in(out / source.slug) if a.format == "litertlm"}


def test_fp32_equals_the_reference_and_the_engine_generates_the_same_text(tiny_litertlm):
    """The LiteRT-LM signatures (prefill_128 with position-0 padding, decode, caches in and out) compute the
    reference; LiteRT-LM's engine, loading the bundle, generates what this runner generates on the same file."""
    source, found = tiny_litertlm
    ref = trace_reference(open_runner(source_artifact(source)), max_new_tokens=16)
    for variant, bars in (("litertlm-fp32", {"max_abs_logit": 1e-3, "min_greedy": 1.0, "min_engine_greedy": 1.0}),
                          ("litertlm-int8", {"min_engine_greedy": 1.0})):
        result = validate_artifact(found[variant], bars, ref)
        assert all(c["passed"] for c in result["checks"]), (variant, source.path.name, result["checks"],
                                                            result["metrics"].get("engine_notes"))
    # the engine check frees the runner's interpreter before the engine loads (not both copies of the weights at
    # once), and the runner loads it again when asked for logits
    runner = open_runner(found["litertlm-fp32"])
    before = runner.prefill(ref.prompts[0])
    assert runner.engine_metrics(ref.prompts[:1])["engine_greedy"] == 1.0 and runner.interpreter is None
    np.testing.assert_array_equal(runner.prefill(ref.prompts[0]), before)


def test_on_the_built_in_kernels_the_runner_still_answers_as_the_engine(tiny_litertlm, monkeypatch):
    """Where XNNPACK's packed copies would not fit (the 1.24B int8 bundle: 15.4 GB resident, 2.87 GB on the built-in
    kernels), the runner computes on TFLite's built-in kernels, says so, and its greedy text still meets the engine's
    (XNNPACK) within their rounding (BUILTIN_NEAR_TIE). Forced here by $EDGEPACK_LITERT_KERNELS."""
    source, found = tiny_litertlm
    monkeypatch.setenv("EDGEPACK_LITERT_KERNELS", "builtin")
    runner = open_runner(found["litertlm-int8"])
    assert runner.kernels == "builtin" and "built-in kernels" in runner.speed_note()
    ref = trace_reference(open_runner(source_artifact(source)), max_new_tokens=16)
    metrics = runner.engine_metrics(ref.prompts)
    assert metrics["engine_greedy"] == 1.0, metrics


def test_the_bundle_carries_tokenizer_metadata_and_the_signatures(tiny_litertlm):
    from litert_lm_builder import litertlm_peek

    source, found = tiny_litertlm
    path = found["litertlm-int8"].files[0]
    assert path.name == f"{source.slug}-int8.litertlm"
    listing = io.StringIO()
    litertlm_peek.peek_litertlm_file(str(path), None, listing)
    text = listing.getvalue()
    assert "TFLiteModel" in text and "HF_Tokenizer" in text and "LlmMetadata" in text, text[:2000]
    assert "generic_model" in text and "stop_tokens" in text, text[:4000]
    info = json.loads((path.parent / "model_info.json").read_text())
    runner = open_runner(found["litertlm-int8"])
    assert set(runner.interpreter.get_signature_list()) == set(info["signatures"]) == {"prefill_128", "decode"}
    inputs = runner.interpreter.get_signature_list()["decode"]["inputs"]
    layers = json.loads((source.path / "config.json").read_text())["num_hidden_layers"]
    assert sorted(inputs) == sorted(["tokens", "input_pos", *[f"kv_cache_{k}_{i}" for k in "kv" for i in range(layers)]])


def test_a_truncated_bundle_is_one_error_line(tiny_models, tmp_path):
    exported = cli("export", "--model", str(tiny_models["llama"]), "--target", "android", "--variant", "litertlm-fp32",
                   out=tmp_path)
    assert exported.returncode == 0, exported.stderr
    bundle = next(tmp_path.rglob("*-fp32.litertlm"))
    bundle.write_bytes(bundle.read_bytes()[:4096])
    done = cli("validate", "--model", str(tiny_models["llama"]), "--target", "android", "--variant", "litertlm-fp32",
               out=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and ".litertlm" in lines[0] and "re-export" in lines[0], done.stderr


# --- the default model (default_dist: its android target with litertlm-int8, exported once in conftest.py) --------
def test_default_model_in_litert_lm_answers_as_the_runner_does(default_source, default_dist):
    from litert_lm import Backend, Engine, SamplerConfig

    validated = cli("validate", "--target", "android", "--variant", "litertlm-int8", "--json", out=default_dist)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-2000:]
    metrics = {r["key"]: r["metrics"] for r in json.loads(validated.stdout)}["android/litertlm/litertlm-int8"]
    assert metrics["engine_greedy"] == 1.0, metrics
    bundle = default_dist / default_source.slug / "android" / "litertlm" / f"{default_source.slug}-int8.litertlm"
    engine = Engine(str(bundle), backend=Backend.CPU(), max_num_tokens=512)
    conversation = engine.create_conversation(sampler_config=SamplerConfig(top_k=1, temperature=0.0),
                                              max_output_tokens=32)
    answer = str(conversation.send_message(FRANCE).contents)  # the bundle's own chat template and stop tokens
    # what edgepack's runner answers from the same file: the int8 model's own answer, which is not always Paris (on
    # an AVX2-only AMD EPYC its first token turns to French, in both; the fp32 .tflite answers Paris: test_tflite.py)
    ran = cli("run", "--target", "android", "--variant", "litertlm-int8", "--prompt", FRANCE, "--max-new-tokens", "32",
              out=default_dist)
    assert ran.returncode == 0, ran.stderr
    common = min(len(answer), len(ran.stdout.strip()), 60)
    assert common >= 20 and answer[:common] == ran.stdout.strip()[:common], (answer, ran.stdout)
