"""cpu target runner: llama.cpp through llama-cpp-python, using the tokenizer and chat template stored in the file."""

from __future__ import annotations

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.native import cpu_threads, llama_cpp_missing, quiet_stderr
from edgepack.runtime.base import Runner, register


@register
class LlamaCppRunner(Runner):
    name = "llama.cpp"
    formats = ("gguf",)

    @classmethod
    def unavailable(cls) -> str | None:
        return llama_cpp_missing()

    def _load_model(self, artifact: Artifact) -> None:
        import llama_cpp

        path = artifact.files[0]
        try:
            with quiet_stderr():
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=self._context_length(path), n_batch=512, n_threads=cpu_threads(),
                                           n_threads_batch=cpu_threads(), logits_all=False, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EdgepackError(f"{path}: llama.cpp cannot load this GGUF ({exc}); it is truncated or corrupt — "
                                "re-export it with --force") from None
        self._vocab = self.llm.n_vocab()

    def _context_length(self, path) -> int:
        """The target's context length (manifest), never beyond what the model was trained for."""
        from gguf import GGUFReader

        from edgepack.artifacts import read_manifest

        manifest = read_manifest(self.artifact.dir) or {}
        try:
            fields = GGUFReader(path).fields
            arch = fields["general.architecture"].contents()
            trained = int(fields[f"{arch}.context_length"].contents())
        except Exception as exc:  # gguf raises several types on a damaged file
            raise EdgepackError(f"{path}: not a readable GGUF ({exc}); re-export it with --force") from None
        return min(manifest.get("context_length", 2048), trained)

    def _logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._vocab,)).copy()

    def _eval(self, ids: list[int]) -> np.ndarray:
        if self.llm.n_tokens + len(ids) > self.llm.n_ctx():
            raise EdgepackError(f"{self.artifact.key}: {self.llm.n_tokens + len(ids)} tokens exceed the context "
                                f"length {self.llm.n_ctx()}; raise context_length in targets.toml and re-export")
        self.llm.eval(ids)
        return self._logits()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        return self._eval(list(ids))

    def decode(self, token: int) -> np.ndarray:
        return self._eval([int(token)])

    def reset(self) -> None:
        self.llm.reset()

    # The file's own tokenizer and chat template, as llama.cpp would use them.
    def encode(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        if not chat:
            return self.llm.tokenize(prompt.encode(), add_bos=self._add_bos(), special=False)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise EdgepackError(f"{self.artifact.files[0]}: the GGUF has no chat template")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        token_text = lambda i: self.llm.detokenize([i], special=True).decode(errors="ignore")  # noqa: E731
        formatter = Jinja2ChatFormatter(template, eos_token=token_text(self.llm.token_eos()),
                                        bos_token=token_text(self.llm.token_bos()), add_generation_prompt=True)
        text = formatter(messages=messages).prompt
        return self.llm.tokenize(text.encode(), add_bos=self._add_bos(), special=True)

    def _add_bos(self) -> bool:
        return self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"

    def decode_text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def eos_ids(self) -> set[int]:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return {t for t in (self.llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)) if t >= 0}
