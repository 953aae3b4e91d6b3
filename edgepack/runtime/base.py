"""The one Runner protocol every format's runner implements, and the generation loop they all share."""

from __future__ import annotations

import json
from typing import ClassVar, Iterator

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError

RUNNERS: dict[str, type["Runner"]] = {}


def register(cls: type["Runner"]) -> type["Runner"]:
    """Class decorator: make a runner the one that loads its formats."""
    for fmt in cls.formats:
        RUNNERS[fmt] = cls
    return cls


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


class Runner:
    """load(artifact); prefill(ids) -> last logits; decode(token) -> logits; reset(); generate(...) streams text.

    Subclasses implement _load_model, prefill, decode and reset; tokenization and generation are shared,
    using the tokenizer files and chat template the exporter wrote beside the artifact.
    """

    name: ClassVar[str]  # as targets.toml spells it: "onnxruntime", "llama.cpp", …
    formats: ClassVar[tuple[str, ...]]

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this runner cannot run on this machine (a missing package, macOS only…), or None when it can."""
        return None

    @classmethod
    def speed_unmeasurable(cls) -> str | None:
        """Why this runner's speed would say nothing about the real runtime here (bench skips it), or None."""
        return None

    @classmethod
    def notes(cls) -> str:
        """What a user should know about this runner on this machine (shown by doctor)."""
        return ""

    def load(self, artifact: Artifact) -> "Runner":
        self.artifact = artifact
        self._load_model(artifact)
        return self

    def _load_model(self, artifact: Artifact) -> None:
        raise NotImplementedError

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Start a new sequence with ids; return the logits after the last one, shape [vocab]."""
        raise NotImplementedError

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the sequence; return the logits after it."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the sequence (the KV cache)."""
        raise NotImplementedError

    @classmethod
    def speed_note(cls) -> str | None:
        """What a reader of this runner's speed must know (where it is not the runtime's real target), or None."""
        return None

    def helper_rss_bytes(self) -> int:
        """Peak resident memory of helper processes that hold the model (0 when the runner has none)."""
        return 0

    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token (for the memory-bandwidth roofline)."""
        return self.artifact.bytes

    def compatibility(self) -> dict[str, str]:
        """Whether other runtimes a user may ship can load this artifact: {runtime: verdict}, {} when not checked."""
        return {}

    # --- shared by every runner -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer  # local: heavy, and not every caller tokenizes

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.artifact.dir)
            except (OSError, ValueError) as exc:
                raise EdgepackError(f"{self.artifact.dir}: cannot load the tokenizer ({exc}); re-export") from None
        return self._tokenizer

    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} - {None}
        gen = self.artifact.dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= {eos} if isinstance(eos, int) else set(eos or [])
        return ids

    def encode(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Token ids for a prompt: a user message (or a message list) through the chat template, or plain text."""
        if not chat:
            return self.tokenizer(prompt).input_ids
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def decode_text(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_ids(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0) -> Iterator[int]:
        """Yield generated token ids, stopping after an end-of-turn token or max_new_tokens."""
        rng = np.random.default_rng(seed)
        eos = self.eos_ids()
        self.reset()
        logits = self.prefill(ids)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, rng)
            yield token
            if token in eos or step == max_new_tokens - 1:
                return
            logits = self.decode(token)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
        """Stream the answer's text as it is generated, using the model's chat template."""
        out: list[int] = []
        shown = ""
        eos = self.eos_ids()
        for token in self.generate_ids(self.encode(prompt), max_new_tokens, temperature, top_p, seed):
            out.append(token)
            text = self.decode_text([t for t in out if t not in eos])
            if text.endswith("\ufffd"):  # a multi-byte character not complete yet
                continue
            yield text[len(shown):]
            shown = text
