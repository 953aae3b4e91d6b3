"""mac target runner: mlx-lm's model code and KV cache in MLX, in the MLX environment (mlx_worker.py, over a pipe).

On Linux MLX runs on its CPU backend. That backend has no fast half-precision path: measured here, a 49152 x 576
quantized matvec takes 0.80 s with float16 activations, 0.20 s with bfloat16 and 0.024 s with float32. So on Linux
the runner computes in float32 over the weights exactly as shipped (float16 / bfloat16 values and quantization
scales are exact in float32): parity checks the folder, its quantization and mlx-lm's model code, not Apple's
half-precision arithmetic, and speed is MLX CPU on Linux, which says nothing about Apple GPUs. On macOS the
folder runs as shipped, on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.runtime.base import Runner, register
from edgepack.tools import MLX, mlx_python

# -I: the worker's own folder must not shadow the mlx package with edgepack/runtime/mlx.py
WORKER = Path(__file__).with_name("mlx_worker.py")
COMPUTE = None if sys.platform == "darwin" else "float32"
SPEED_NOTE = "MLX CPU on Linux, not representative of Apple GPUs"


@register
class MlxRunner(Runner):
    name = "mlx"
    formats = ("mlx",)

    @classmethod
    def notes(cls) -> str:
        return f"{MLX} (own environment); on Linux: CPU backend, float32 compute" if COMPUTE else MLX

    @classmethod
    def speed_note(cls) -> str | None:
        return SPEED_NOTE if COMPUTE else None  # computing in float32 is what makes it the CPU backend's figure

    def _load_model(self, artifact: Artifact) -> None:
        python = mlx_python()
        if python is None:
            raise EdgepackError(f"{artifact.key}: {MLX} cannot be installed on this machine (see the line above)")
        self.folder = artifact.files[0].parent
        self.vocab = json.loads((self.folder / "config.json").read_text())["vocab_size"]
        self._proc = subprocess.Popen([str(python), "-I", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        self.loaded = self._ask({"op": "load", "path": str(self.folder), "compute": COMPUTE})
        self.started = False

    def _ask(self, request: dict) -> dict:
        proc = self._proc
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
            line = proc.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            proc.wait()
            stderr = proc.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"]
            raise EdgepackError(f"{self.artifact.key}: the MLX worker stopped ({stderr[-1][:200]})")
        answer = json.loads(line)
        if "error" in answer:
            what = "cannot load" if request["op"] == "load" else f"{request['op']} failed in"
            self.close()
            raise EdgepackError(f"{self.artifact.key}: mlx-lm {what} {self.folder} ({answer['error'][:200]}); "
                                "re-export the mac target with --force")
        if answer["bytes"]:
            answer["payload"] = proc.stdout.read(answer["bytes"])
        return answer

    def _logits(self, request: dict) -> np.ndarray:
        logits = np.frombuffer(self._ask(request)["payload"], dtype=np.float32)
        return logits[: self.vocab].copy()

    def reset(self) -> None:
        self.started = False

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.started = True
        return self._logits({"op": "prefill", "ids": [int(t) for t in ids]})

    def decode(self, token: int) -> np.ndarray:
        if not self.started:
            raise EdgepackError(f"{self.artifact.key}: decode before prefill")
        return self._logits({"op": "decode", "token": int(token)})

    def mlx_generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy tokens from mlx-lm's own generation loop (generate_step), through the first end-of-turn token."""
        return self._ask({"op": "generate", "ids": [int(t) for t in ids], "max_tokens": max_new_tokens,
                          "eos": sorted(self.eos_ids())})["tokens"]

    def helper_rss_bytes(self) -> int:
        """The MLX worker's peak resident memory: it holds the model."""
        return self._ask({"op": "stats"})["peak_rss_bytes"]

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __del__(self) -> None:
        self.close()
