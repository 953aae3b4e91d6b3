"""The reference runner: transformers in fp32 on the source folder, the ground truth every artifact is held to."""

from __future__ import annotations

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.runtime.base import Runner, register
from edgepack.source import Source


def source_artifact(source: Source) -> Artifact:
    """The source model seen as an artifact of target 'source'."""
    return Artifact("source", "transformers", "fp32", source.path, tuple(sorted(source.path.glob("*.safetensors"))))


@register
class ReferenceRunner(Runner):
    name = "transformers"
    formats = ("transformers",)

    def _load_model(self, artifact: Artifact) -> None:
        import torch
        from edgepack.native import cpu_threads, import_quietly

        import_quietly("torchao", "transformers.quantizers.auto")  # its registry imports torchao when installed
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(cpu_threads())
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(artifact.dir, dtype=torch.float32).eval()
        self.past = None

    def _forward(self, ids: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return self._forward(list(ids))

    def decode(self, token: int) -> np.ndarray:
        return self._forward([int(token)])

    def reset(self) -> None:
        from transformers import DynamicCache

        self.past = DynamicCache()
