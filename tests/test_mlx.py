"""mac target: folders mlx-lm loads, converted and quantized by mlx-lm itself, run by mlx-lm's model code in MLX
(its CPU backend here, in the MLX environment edgepack.tools makes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.artifacts import artifacts_in
from edgepack.exporters.mlx import GROUP_SIZE
from edgepack.runtime import open_runner
from edgepack.runtime.parity import check, measure, trace_reference
from edgepack.runtime.reference import source_artifact
from edgepack.targets import load_targets

from conftest import FAMILY_KINDS


def cli(*args, out: Path, timeout=1800):
    return subprocess.run([sys.executable, "-m", "edgepack", *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def tiny_mac(request, tiny_models, tmp_path_factory):
    from edgepack.exporters import export_target
    from edgepack.source import resolve

    source = resolve(str(tiny_models[request.param]))
    out = tmp_path_factory.mktemp(f"mac-{request.param}")
    export_target(source, load_targets().targets["mac"], {"mlx": ["fp16", "q8", "q4"]}, out / source.slug,
                  force=False, log=lambda _: None)
    return source, {a.variant: a for a in artifacts_in(out / source.slug) if a.target == "mac"}


def test_folders_are_what_mlx_lm_loads(tiny_mac):
    source, found = tiny_mac
    for variant, artifact in found.items():
        folder = artifact.files[0].parent
        assert folder.name == variant and artifact.files[0].suffix == ".safetensors"
        names = {f.name for f in artifact.files}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
        assert "chat_template.jinja" in names or "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        source_config = json.loads((source.path / "config.json").read_text())
        assert config["model_type"] == source_config["model_type"]
        if variant in ("q8", "q4"):  # q4: mlx-lm's mixed_4_6 recipe lists its 6-bit layers after the defaults
            defaults = {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)}
            assert defaults == {"group_size": GROUP_SIZE, "bits": int(variant[1]), "mode": "affine"}, config
            six = [k for k, v in config["quantization"].items() if isinstance(v, dict) and v["bits"] == 6]
            assert bool(six) == (variant == "q4"), six
        else:
            assert "quantization" not in config
    # quantized weights are packed: q4 is about half of q8, and both well below fp16
    sizes = {v: a.files[0].stat().st_size for v, a in found.items()}
    assert sizes["q4"] < 0.65 * sizes["q8"] < 0.65 * sizes["fp16"], sizes


def test_mlx_follows_the_reference(tiny_mac):
    """fp16 weights through mlx-lm's model code equal the reference up to fp16 rounding of the weights, on every
    family (rope scaling, partial rotary, sliding windows, Gemma's norms); q8 and q4 stay close; and edgepack's
    generation loop on the runner equals mlx-lm's own generate_step, token for token."""
    source, found = tiny_mac
    ref = trace_reference(open_runner(source_artifact(source)), max_new_tokens=16)
    fp16 = measure(open_runner(found["fp16"]), ref)
    spread = max(float(np.ptp(logits)) for logits in ref.logits)
    assert fp16["max_abs_logit"] < 0.01 * spread and fp16["top1"] >= 0.97 and fp16["kl"] < 1e-3, (fp16, spread)
    q8 = measure(open_runner(found["q8"]), ref)
    q4 = measure(open_runner(found["q4"]), ref)
    # random weights make absolute fidelity meaningless (near-ties): q8 close (measured KL ≤ 0.002), q4 further
    assert q8["kl"] < 0.01 and q8["kl"] < q4["kl"], (q8, q4)

    runner = open_runner(found["q4"])
    prompt = ref.prompts[0]
    ours = list(runner.generate_ids(prompt, 16))
    assert runner.mlx_generate(prompt, 16) == ours


@pytest.mark.slow  # about 8 min (MLX on Linux computes in float32 on the CPU): make test-all; tiny families in make test
def test_default_model_cli(default_source, tmp_path):
    """Export, validate against targets.toml's bars, and answer Paris: the whole mac path on the default model."""
    out = tmp_path / "dist"
    done = cli("export", "--target", "mac", out=out)
    assert done.returncode == 0, done.stderr
    done = cli("validate", "--target", "mac", "--json", out=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    results = {r["key"]: r for r in json.loads(done.stdout[done.stdout.index("["):])}
    assert set(results) == {"mac/mlx/fp16", "mac/mlx/q8", "mac/mlx/q4"}
    bars = load_targets().targets["mac"].formats["mlx"].thresholds
    for key, result in results.items():
        outcomes = check(result["metrics"], bars[key.rsplit("/", 1)[1]])
        assert outcomes and all(o["passed"] for o in outcomes), (key, outcomes)

    done = cli("run", "--target", "mac", "--variant", "fp16", "--prompt", "What is the capital of France?", out=out)
    assert done.returncode == 0 and "Paris" in done.stdout, done.stdout + done.stderr

    # a damaged weights file (same size, so the manifest's size check passes): one clear line from MLX's loader
    weights = out / default_source.slug / "mac" / "q4" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.write(b"\xff" * 64)
    done = cli("run", "--target", "mac", "--variant", "q4", "--prompt", "Hi", out=out)
    assert done.returncode != 0 and "re-export the mac target" in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
