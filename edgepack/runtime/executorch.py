"""android and ios runner, ExecuTorch part: executorch's Python runtime (executorch.runtime, the C++ runtime apps link,
with the XNNPACK backend and the llama:: custom-op kernels) on a .pte's forward method.

The KV cache is inside the program (exporters/executorch.py): prefill sends the prompt in chunks of max_seq_len
with input_pos = the chunk's first slot, decode one token at the next slot; a new sequence starts again at 0.
"""

from __future__ import annotations

import importlib

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.model_info import read_model_info
from edgepack.native import modules_missing, quiet_stderr
from edgepack.runtime.base import Runner, register


def load_program(path):
    """A loaded executorch Program for path, or one clear error when the file is not a loadable .pte."""
    with quiet_stderr():  # it imports torchao, which logs the CUDA kernels it cannot load here
        importlib.import_module("executorch.extension.llm.custom_ops.custom_ops")  # the llama:: kernels, registered
    from executorch.runtime import Runtime

    try:
        with quiet_stderr():
            return Runtime.get().load_program(str(path))
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgepackError(f"{path}: ExecuTorch cannot load this program ({first[:200]}); it is truncated or "
                            "corrupt — re-export it with --force") from None


@register
class ExecuTorchRunner(Runner):
    name = "executorch"
    formats = ("executorch",)

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("executorch")

    @classmethod
    def notes(cls) -> str:
        return "executorch.runtime (XNNPACK) on the .pte's forward method"

    def _load_model(self, artifact: Artifact) -> None:
        import torch

        self._torch = torch
        self.info = read_model_info(artifact.files[0].parent, artifact.target)
        self.program = load_program(artifact.files[0])
        methods = set(self.program.method_names)
        if "forward" not in methods:
            raise EdgepackError(f"{artifact.files[0]}: no forward method (has {sorted(methods)}); re-export it")
        with quiet_stderr():  # XNNPACK's cpuinfo logs what it cannot read of /sys at the first method's load
            self.max_seq_len = int(self.program.load_method("get_max_seq_len").execute([])[0])
            self.capacity = int(self.program.load_method("get_max_context_len").execute([])[0])
            self.forward = self.program.load_method("forward")
        self.reset()

    def weight_bytes(self) -> int:
        """Bytes read per decoded token: the file less its fp32 embedding table, of which a token reads one row (the
        exporter keeps it apart from the head in both variants)."""
        return self.artifact.bytes - self.info["vocab_size"] * self.info["hidden_size"] * 4

    def reset(self) -> None:
        self.length = 0  # custom_sdpa reads slots < input_pos + T only: stale slots need no clearing

    def _run(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.capacity:
            raise EdgepackError(f"{self.artifact.key}: {self.length + len(ids)} tokens exceed the context length "
                                f"{self.capacity}; raise context_length in targets.toml and re-export")
        torch = self._torch
        out = self.forward.execute([torch.tensor([ids], dtype=torch.long), torch.tensor([self.length])])[0]
        self.length += len(ids)
        return out[0].numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.reset()
        ids = [int(t) for t in ids]
        for start in range(0, len(ids), self.max_seq_len):
            logits = self._run(ids[start:start + self.max_seq_len])
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._run([int(token)])
