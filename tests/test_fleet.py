"""edgepack fleet on a local Ray: two tiny models × two targets, one worker killed mid-export, one report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgepack.fleet import read_fleet

from conftest import PLAIN_TARGETS


@pytest.fixture
def fleet_file(tiny_models, tmp_path) -> Path:
    (tmp_path / "targets.toml").write_text(PLAIN_TARGETS)  # only cpu and web run: FLEET.toml's targets
    path = tmp_path / "FLEET.toml"
    path.write_text(f'targets = ["cpu", "web"]\ntargets_file = "targets.toml"\n'
                    f'[[model]]\npath = "{tiny_models["llama"]}"\n[[model]]\npath = "{tiny_models["qwen2"]}"\n')
    return path


def test_a_fleet_survives_a_killed_worker_and_reports_what_the_single_commands_do(fleet_file, tiny_models, tmp_path):
    """`edgepack fleet` as a user runs it, on the embedded local Ray; the first export's Ray worker (the pid its
    progress line names) is killed with SIGKILL, Ray retries the task, and the fleet still ends with exit 0."""
    out = tmp_path / "out"  # given as a URL, as for a cluster whose nodes share no disk (fsspec writes it)
    proc = subprocess.Popen([sys.executable, "-m", "edgepack", "fleet", str(fleet_file), "--out", f"file://{out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, lines = [], []
    for line in proc.stdout:
        lines.append(line.rstrip())
        started = re.search(r"^(\S+): export started \(pid (\d+)\)", line)
        if started and not killed:
            os.kill(int(started.group(2)), signal.SIGKILL)  # the Ray worker; its export child dies with it
            killed.append(started.group(1))
    assert proc.wait(timeout=60) == 0, "\n".join(lines[-30:])
    assert killed and sum(f"{killed[0]}: export started" in line for line in lines) == 2, lines  # retried
    summary = json.loads((out / "fleet.json").read_text())
    assert not summary["failed"], summary["failed"]
    cells = {(c["model"], c["target"]): c for c in summary["cells"]}
    assert set(cells) == {(m, t) for m in ("tiny-llama", "tiny-qwen2") for t in ("cpu", "web")}
    assert all(c["passed"] and c["decode_tok_s"] > 0 for c in cells.values()), cells

    # nothing complete-looking from the killed attempt: every target folder is whole, no job folder left behind
    for model, target in cells:
        manifest = json.loads((out / model / target / "manifest.json").read_text())
        for artifact in manifest["artifacts"]:
            for entry in artifact["files"]:
                assert (out / model / target / entry["path"]).stat().st_size == entry["bytes"]
    assert not any((Path(tempfile.gettempdir()) / "edgepack-fleet" / f"{job}").exists() for job in summary["jobs"])
    assert (out / "fleet.html").read_text().count("<svg") == 3  # size vs KL for cpu and web, tok/s vs parameters
    assert "tiny-llama" in (out / "tiny-llama" / "report.md").read_text()

    # each cell equals what `edgepack export` + `validate` produce for that model by hand
    for model in ("llama", "qwen2"):
        common = ["--model", str(tiny_models[model]), "--targets", str(fleet_file.parent / "targets.toml"),
                  "--out", str(tmp_path / "single")]
        run = lambda *a: subprocess.run([sys.executable, "-m", "edgepack", *a, *common],  # noqa: E731
                                        capture_output=True, text=True, timeout=900)
        assert run("export", "--target", "cpu", "web").returncode == 0
        validated = run("validate", "--json")
        assert validated.returncode == 0, validated.stderr
        for result in json.loads(validated.stdout):
            cell = cells[(f"tiny-{model}", result["key"].split("/")[0])]
            assert cell["kl"] == pytest.approx(result["metrics"]["kl"], rel=1e-6, abs=1e-12), (cell, result)
            assert cell["top1"] == result["metrics"]["top1"]


def test_a_bad_fleet_file_is_one_error_naming_the_key(tmp_path):
    from edgepack.cli import main

    path = tmp_path / "FLEET.toml"
    for text, message in (("[[model]]\npath = '/nonexistent'\n", "does not exist"),
                          ("[[model]]\npath = '.'\ntargets = ['tv']\n", "no target 'tv'"),
                          ("modles = []\n", "unknown key 'modles'"),
                          ("targets = ['cpu']\n", "no [[model]] tables")):
        path.write_text(text)
        with pytest.raises(Exception) as info:
            read_fleet(path)
        assert message in str(info.value), (text, info.value)
    assert main(["fleet", str(tmp_path / "missing.toml")]) == 2


def test_a_job_no_node_can_hold_is_reported_instead_of_waiting_forever(tmp_path):
    """A model whose export needs more memory than any node has: Ray would leave the task pending for ever."""
    import struct

    from edgepack.fleet import run_fleet

    big = tmp_path / "huge-model"
    big.mkdir()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [200_000, 200_000], "data_offsets": [0, 0]}}).encode()
    (big / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)  # 40 B parameters, no data
    fleet = tmp_path / "FLEET.toml"
    fleet.write_text(f'targets = ["android"]\n[[model]]\npath = "{big}"\n')
    summary = run_fleet(read_fleet(fleet), str(tmp_path / "out"), log=lambda *a: None)
    assert [f["job"] for f in summary["failed"]] == ["huge-model-android"] and not summary["cells"]
    assert "more than any node's" in summary["failed"][0]["error"]
    assert "huge-model-android" in (tmp_path / "out" / "fleet.html").read_text()
