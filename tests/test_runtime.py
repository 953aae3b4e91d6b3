"""Bench and report on real runs; sampling; the atomic folder an export is built in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgepack.artifacts import atomic_dir
from edgepack.runtime.base import sample
from edgepack.runtime.bench import add_rooflines, bench_artifact, memory_read_bandwidth
from edgepack.runtime.reference import source_artifact
from edgepack.runtime.report import load_report, update_report, write_reports
from edgepack.source import resolve


def test_bench_measures_speed_memory_and_roofline_in_a_fresh_process(tiny_llama):
    artifact = source_artifact(resolve(str(tiny_llama)))
    probe = memory_read_bandwidth(megabytes=64, repeats=2)
    bandwidth = probe["bytes_per_s"]
    assert bandwidth > 1e8 and "threads" in probe["method"]
    result = bench_artifact(artifact, new_tokens=4, runs=5)
    assert add_rooflines([result], [probe]) == probe
    assert len(result["decode_tok_s_runs"]) == 5
    assert result["decode_tok_s"] == pytest.approx(float(np.median(result["decode_tok_s_runs"])), rel=1e-3)
    assert result["ttft_s"] > 0 and result["load_s"] > 0
    assert result["peak_rss_bytes"] > 50e6  # torch alone is more than that
    assert result["roofline_ratio"] == pytest.approx(result["decode_tok_s"] / (bandwidth / artifact.bytes), abs=1e-3)
    assert result["bound"] == ("memory-bound" if result["roofline_ratio"] >= 0.6 else "compute-bound")


def test_a_roofline_a_runtime_beats_is_raised_to_that_runtimes_read_rate():
    probes = [{"bytes_per_s": 30e9, "method": "probe"}, {"bytes_per_s": 32e9, "method": "probe"}]
    slow, fast = {"decode_tok_s": 50.0, "weight_bytes": 200e6}, {"decode_tok_s": 100.0, "weight_bytes": 400e6}
    used = add_rooflines([slow, fast], probes)
    assert used["bytes_per_s"] == 40e9 and "raised from 32.0 GB/s" in used["method"]
    assert fast["roofline_ratio"] == 1.0 and slow["roofline_ratio"] == 0.25
    assert (fast["bound"], slow["bound"]) == ("memory-bound", "compute-bound")


def test_report_renders_a_table_and_plots(tmp_path, tiny_llama):
    artifact = source_artifact(resolve(str(tiny_llama)))
    update_report(tmp_path, "tiny", artifact, "parity", {
        "metrics": {"kl": 0.01, "top1": 0.97, "max_abs_logit": 0.5, "greedy": 1.0, "greedy_tokens": ["8/8"],
                    "ppl_ratio": 1.01}, "checks": [{"check": "min_top1", "passed": True}]})
    update_report(tmp_path, "tiny", artifact, "bench", {"ttft_s": 0.01, "decode_tok_s": 100.0,
                                                        "roofline_tok_s": 200.0, "roofline_ratio": 0.5,
                                                        "bound": "compute-bound"},
                  bandwidth_gbs=30.0, bandwidth_method="NumPy sum of float32 on 2 threads")
    markdown = write_reports(tmp_path)
    assert "| source (transformers) | fp32 |" in markdown and "| 50 % (compute) | pass |" in markdown
    assert "30.0 GB/s (NumPy sum of float32 on 2 threads)" in markdown
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") == 2  # size vs KL, tok/s per variant
    assert load_report(tmp_path)["rows"]["source/transformers/fp32"]["bench"]["decode_tok_s"] == 100.0


def test_sampling_is_greedy_at_zero_temperature_and_respects_top_p():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    assert sample(logits, 0.0, 1.0, rng) == 1
    draws = {sample(logits, 1.0, 0.5, rng) for _ in range(200)}
    assert draws == {1}  # token 1 alone carries more than half the mass
    assert {sample(logits, 1.0, 1.0, rng) for _ in range(400)} >= {1, 2}


def test_a_completed_atomic_folder_replaces_the_old_one(tmp_path):
    final = tmp_path / "cpu"
    with atomic_dir(final) as tmp:
        (tmp / "a.bin").write_text("one")
    with atomic_dir(final) as tmp:
        (tmp / "b.bin").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["cpu"]


def test_a_failed_build_leaves_the_previous_folder_untouched(tmp_path):
    final = tmp_path / "cpu"
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("disk full")
    assert [p.name for p in final.iterdir()] == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["cpu"]


def test_a_killed_build_leaves_nothing_that_looks_complete(tmp_path):
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom edgepack.artifacts import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'weights.bin').write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n    time.sleep(60)\n"
        "    (tmp / 'manifest.json').write_text('{}')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cpu")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cpu").exists()
    assert not list(tmp_path.rglob("manifest.json"))
    with atomic_dir(tmp_path / "cpu") as tmp:  # the next build sweeps the leftover
        (tmp / "manifest.json").write_text(json.dumps({}))
    assert [p.name for p in tmp_path.iterdir()] == ["cpu"]
