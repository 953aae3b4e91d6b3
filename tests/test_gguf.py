"""cpu target: GGUF files that llama.cpp loads unmodified, F16 equal to the reference, metadata readable back."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgepack.artifacts import Artifact, artifacts_in
from edgepack.errors import EdgepackError
from edgepack.exporters import export_target
from edgepack.runtime import open_runner
from edgepack.runtime.parity import measure, trace_reference
from edgepack.runtime.reference import source_artifact
from edgepack.source import resolve
from edgepack.targets import load_targets

from conftest import FAMILY_KINDS

pytest.importorskip("llama_cpp", reason="the cpu target needs llama-cpp-python (make install builds it)")

CPU = load_targets().targets["cpu"]


def smallest_margin(ref) -> float:
    """The reference's smallest gap between its top two logits along its greedy answers."""
    return min(float(np.diff(np.sort(logits, axis=-1)[:, -2:], axis=-1).min()) for logits in ref.logits)


def export(folder, tmp_path, variants=("F16",)) -> list[Artifact]:
    source = resolve(str(folder))
    export_target(source, CPU, {"gguf": list(variants)}, tmp_path / source.slug, force=False, log=lambda *_: None)
    return artifacts_in(tmp_path / source.slug)


def test_llama_cpp_is_the_avx2_build_the_makefile_asks_for():
    """make install compiles llama.cpp for AVX2 (Makefile LLAMA_CMAKE): a native build on a VM that reports Intel AMX
    dies at its first AMX matmul (-11), which then shows up as crashes all over the suite; this says why, once."""
    import llama_cpp

    features = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in features and "AMX" not in features, (
        f"llama-cpp-python was not built with the Makefile's LLAMA_CMAKE ({features.strip()}); "
        "reinstall it: make clean && make install")


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_llama_cpp_runs_each_family_like_the_reference(tiny_models, tmp_path, kind):
    artifacts = {a.variant: a for a in export(tiny_models[kind], tmp_path, ("F32", "F16"))}
    reference = open_runner(source_artifact(resolve(str(tiny_models[kind]))))
    ref = trace_reference(reference, max_new_tokens=16)
    exact = measure(open_runner(artifacts["F32"]), ref)  # llama.cpp keeps its KV cache in F16 even here
    assert exact["kl"] <= 1e-5 and exact["max_abs_logit"] <= 0.05, exact
    # greedy equal, unless the reference itself has a top-2 gap that this difference can flip (phi3: 0.014)
    assert exact["greedy"] == 1.0 or smallest_margin(ref) < 2 * exact["max_abs_logit"], exact
    half = measure(open_runner(artifacts["F16"]), ref)
    assert half["kl"] <= 1e-4, half
    if kind in ("llama", "qwen2"):  # random tiny models have near-ties an fp16 rounding may flip; these have none
        assert half["greedy"] == 1.0, half


def test_metadata_reads_back_with_gguf_reader(tiny_models, tmp_path):
    from gguf import GGUFReader

    (artifact,) = export(tiny_models["qwen3"], tmp_path)
    fields = GGUFReader(artifact.files[0]).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    config = json.loads((tiny_models["qwen3"] / "config.json").read_text())
    assert value("general.architecture") == "qwen3"
    assert value("qwen3.block_count") == 2
    assert value("qwen3.attention.head_count") == 4 and value("qwen3.attention.head_count_kv") == 2
    assert value("qwen3.attention.key_length") == 32
    assert value("qwen3.context_length") == config["max_position_embeddings"]
    assert value("qwen3.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert value("tokenizer.ggml.eos_token_id") == 2
    assert value("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in value("tokenizer.chat_template")


def test_the_file_tokenizes_chat_prompts_like_the_reference(tiny_models, tmp_path):
    (artifact,) = export(tiny_models["llama"], tmp_path)
    ours, reference = open_runner(artifact), open_runner(source_artifact(resolve(str(tiny_models["llama"]))))
    for prompt in ("What is the capital of France?", "Count: 1, 22, 333.\nDone!"):
        assert ours.encode(prompt) == reference.encode(prompt)
        assert ours.encode(prompt, chat=False) == reference.encode(prompt, chat=False)


def test_quantized_variants_come_from_llama_cpp_and_shrink(tiny_models, tmp_path):
    artifacts = export(tiny_models["llama"], tmp_path, ("F16", "Q8_0", "Q4_0"))
    sizes = {a.variant: a.bytes for a in artifacts}
    assert sizes["Q4_0"] < sizes["Q8_0"] < sizes["F16"]
    from gguf import GGUFReader

    q4 = next(a for a in artifacts if a.variant == "Q4_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(q4.files[0]).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_an_unchanged_export_is_skipped_and_force_rebuilds(tiny_models, tmp_path):
    first = export(tiny_models["qwen2"], tmp_path)
    mtime = first[0].files[0].stat().st_mtime_ns
    second = export(tiny_models["qwen2"], tmp_path, ("F16", "Q8_0"))
    assert {a.variant for a in second} == {"F16", "Q8_0"}
    assert next(a for a in second if a.variant == "F16").files[0].stat().st_mtime_ns == mtime  # reused
    source = resolve(str(tiny_models["qwen2"]))
    export_target(source, CPU, {"gguf": ["Q8_0"]}, tmp_path / source.slug, force=True, log=lambda *_: None)
    third = {a.variant: a for a in artifacts_in(tmp_path / source.slug)}
    assert set(third) == {"F16", "Q8_0"}  # --force rebuilt what was asked for and kept the rest
    assert third["F16"].files[0].stat().st_mtime_ns == mtime
    kept = third["Q8_0"].files[0].stat().st_mtime_ns
    third["F16"].files[0].unlink()  # a file deleted by hand: built again, not "up to date"
    fourth = {a.variant: a for a in export(tiny_models["qwen2"], tmp_path, ("F16",))}
    assert fourth["F16"].files[0].is_file() and fourth["Q8_0"].files[0].stat().st_mtime_ns == kept


def test_a_tokenizer_gguf_cannot_express_is_one_clear_error(tiny_models, tmp_path):
    folder = tmp_path / "odd-tokenizer"
    shutil.copytree(tiny_models["llama"], folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EdgepackError, match="GGUF cannot express this tokenizer"):
        export(folder, tmp_path / "dist")
    assert not (tmp_path / "dist" / "odd-tokenizer" / "cpu").exists()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_disk_that_fills_leaves_no_partial_file(tiny_models, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edgepack", "export", "--model", str(tiny_models["llama"]), "--target", "cpu",
         "--variant", "F16", "Q4_0", "--out", str(tmp_path)],
        capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("edgepack: error:"), out.stderr
    assert not list(tmp_path.rglob("*.gguf")) and not (tmp_path / "tiny-llama" / "cpu").exists()


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_gguf_is_one_clear_error(tiny_models, tmp_path, damage):
    (artifact,) = export(tiny_models["llama"], tmp_path)
    path = artifact.files[0]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 3])
    else:
        data[4:64] = b"\xff" * 60
        path.write_bytes(bytes(data))
    out = subprocess.run([sys.executable, "-m", "edgepack", "run", "--model", str(tiny_models["llama"]), "--target",
                          "cpu", "--prompt", "hi", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepack: error:"), out.stderr


# make test: F16 and Q4_K_M (the importance-matrix path); every variant (9 min on a make test worker): make test-all
@pytest.mark.parametrize("variants", [("F16", "Q4_K_M"), pytest.param(None, marks=pytest.mark.slow, id="all")])
def test_default_model_cpu_variants_export_and_validate(default_source, tmp_path, variants):
    env_out = tmp_path / "dist"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgepack", *a, "--out", str(env_out)],  # noqa: E731
                                    capture_output=True, text=True, timeout=1200)
    variants = variants or CPU.formats["gguf"].variants
    exported = run("export", "--target", "cpu", "--variant", *variants)
    assert exported.returncode == 0, exported.stderr
    files = sorted(p.name for p in (env_out / default_source.slug / "cpu").glob("smollm2-*.gguf"))
    assert files == sorted(f"smollm2-135m-instruct-{v}.gguf" for v in variants)
    validated = run("validate", "--target", "cpu", "--json")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    results = {r["key"]: r for r in json.loads(validated.stdout)}
    assert results["cpu/gguf/F16"]["metrics"]["greedy"] == 1.0
    for variant in {"Q5_K_S", "Q4_K_M", "Q4_0", "Q2_K"} & set(variants):  # the imatrix beats plain llama-quantize
        result = results[f"cpu/gguf/{variant}"]
        assert result["metrics"]["kl"] < result["baseline"]["kl"], result
    answer = run("run", "--target", "cpu", "--variant", "F16", "--prompt", "What is the capital of France?")
    assert "Paris" in answer.stdout, answer.stdout + answer.stderr

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(env_out / default_source.slug / "cpu" / "smollm2-135m-instruct-F16.gguf"),
                          verbose=False)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0, max_tokens=32)
    assert "Paris" in reply["choices"][0]["message"]["content"]


# The export, stopped for good right after its first quantized file: the kill below lands mid-export every time,
# instead of racing a poll against an export that may finish first.
_STOP_AFTER_FIRST_QUANTIZE = """
import pathlib, sys, time
import edgepack.exporters.gguf as gguf
real = gguf.quantize
def quantize(*args):
    real(*args)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(3600)
gguf.quantize = quantize
from edgepack.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_killed_export_leaves_no_manifest_and_no_complete_looking_folder(default_source, tmp_path):
    import os
    import time

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-c", _STOP_AFTER_FIRST_QUANTIZE, str(stopped), "export", "--target",
                             "cpu", "--variant", "F16", "Q8_0", "Q4_K_M", "--out", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = tmp_path / "out" / default_source.slug
    deadline = time.monotonic() + 600
    while not stopped.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stopped.exists() and proc.poll() is None, "the export did not reach its first quantized file"
    assert list(model.glob(".cpu.tmp-*/*Q8_0.gguf"))  # mid-export: files written, no manifest yet
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (model / "cpu").exists()
    assert not list(model.rglob("manifest.json"))
    again = subprocess.run([sys.executable, "-m", "edgepack", "export", "--target", "cpu", "--variant", "Q4_0",
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in model.iterdir()) == ["cpu"]  # the leftover was swept
