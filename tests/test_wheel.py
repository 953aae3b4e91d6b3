"""edgepack as a user installs it: a built wheel in a fresh venv, run from a folder that is not the checkout.

The venv gets the wheel with --no-deps and sees the dependencies the README's setup already installed through a
.pth line (re-downloading torch, onnxruntime and the rest would add 10 minutes and test PyPI, not edgepack); pip
check proves those satisfy the wheel's own requirements. Everything edgepack itself needs (the targets matrix,
the templates, the page and its JavaScript, the helper tools) must come from the wheel or the user cache."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from edgepack.web.browser import Browser, chromium_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The venv's bin folder, with edgepack installed from a wheel built from this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "wheels"), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "wheels").glob("edgepack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("edgepack/targets.toml", "edgepack/web/static/index.html", "edgepack/data/parity.json",
                   "edgepack/mobile/templates/EdgepackLlm.kt",
                   "edgepack/web/node_modules/onnxruntime-web/dist/ort.all.min.mjs",
                   "edgepack/web/node_modules/@wllama/wllama/esm/index.js"):
        assert needed in names, needed
    assert not any(n.endswith(".map") or "/.bin/" in n for n in names)

    venv = tmp / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "edgepack-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    check = subprocess.run([venv / "bin" / "python", "-m", "pip", "check"], capture_output=True, text=True)
    assert "edgepack" not in check.stdout, check.stdout  # the wheel's requirements are met
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args, timeout=900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run([str(bin_dir / a) if i == 0 else str(a) for i, a in enumerate(args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_exports_validates_and_serves_outside_the_checkout(installed, tiny_llama, tmp_path):
    where = _run(installed, tmp_path, "python", "-c", "import edgepack, edgepack.targets as t; "
                 "print(edgepack.__file__); print(t.DEFAULT_TARGETS_FILE)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(installed.parent), line  # the installed copy, not the checkout

    # the shipped matrix, written out for editing: a random tiny model cannot meet the default model's bars
    written = _run(installed, tmp_path, "edgepack", "targets", "--write", "mine.toml")
    assert written.returncode == 0, written.stderr
    mine = tmp_path / "mine.toml"
    mine.write_text("".join(line for line in mine.read_text().splitlines(keepends=True)
                            if not line.startswith(("F16 = ", "Q4_K_M = ", "q4 = "))))

    common = ("--model", tiny_llama, "--targets", "mine.toml", "--out", "dist")
    exported = _run(installed, tmp_path, "edgepack", "export", "--target", "cpu", "web", "--variant", "F16", "Q4_K_M",
                    "q4", *common)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "dist" / "tiny-llama" / "cpu" / "imatrix.gguf").is_file()  # llama.cpp's tools were found
    validated = _run(installed, tmp_path, "edgepack", "validate", *common)
    assert validated.returncode == 0, validated.stderr[-2000:]
    for needle in ("cpu/gguf/F16", "cpu/gguf/Q4_K_M", "web/onnx/q4"):
        assert needle in validated.stdout + validated.stderr, validated.stdout + validated.stderr

    if chromium_path() is None:
        pytest.skip("the page check needs Debian's chromium (make test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen([installed / "edgepack", "serve", "--dist", "dist", "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
                time.sleep(0.5)
        with Browser(webgpu=False) as browser:
            state = browser.chat(url, model="tiny-llama", engine="wasm", variant="q4", prompt="Hello", n=8,
                                 temperature=0)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert state["loaded"]["engine"] == "wasm" and state["done"]["count"] >= 1
