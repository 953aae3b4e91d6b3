"""android runner, LiteRT-LM part: a .litertlm proven two ways.

- Logits: the .tflite inside the bundle, run by ai-edge-litert's Interpreter the way LiteRT-LM drives it (prefill
  all but the last prompt token through prefill_<P>, padded with position 0; then decode; every cache fed back
  whole). This is what parity measures against the reference.
- The engine: validate also loads the bundle in LiteRT-LM (litert-lm-api, the C++ engine Android apps use), checks
  that its tokenizer gives the same ids, and generates greedily for the chat prompts. Its text must equal this
  runner's greedy text on the same .tflite; a difference counts only at a near-tie (< 0.1 logit), which is shown.
  bench runs the engine too (its own TTFT and decode speed, beside this runner's).
"""

from __future__ import annotations

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.model_info import read_model_info
from edgepack.native import cpu_threads, modules_missing, quiet_stderr
from edgepack.runtime.base import Runner, register

ENGINE_TOKENS = 32  # new tokens per prompt in the engine comparison
NEAR_TIE = 0.1
# Where this runner computes with TFLite's built-in kernels and the engine with XNNPACK, their logits differ by the
# kernels' own rounding: measured max|Δ| 0.34 (the 1.24B int8 bundle) and 0.48 (the default model's int8 .tflite);
# a difference between the two greedy texts counts under twice the larger
BUILTIN_NEAR_TIE = 1.0
# XNNPACK packs a .litertlm's int8 weights for each of its two signatures at about 3.3× their size: the 1.24B int8
# bundle's 2.32 GB TFLite section took 15.4 GB resident under XNNPACK, 2.87 GB under the built-in kernels
PACKED_PER_SIGNATURE = 3.3


def tflite_section(path) -> bytes:
    """The TFLiteModel section of a .litertlm, read with litert-lm-builder's own header schema."""
    from litert_lm_builder import litertlm_core, litertlm_peek
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    try:
        import io

        header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
        sections = header.SectionMetadata()
        objects = [sections.Objects(i) for i in range(sections.ObjectsLength() if sections else 0)]
        found = [o for o in objects if o.DataType() == schema.AnySectionDataType.TFLiteModel]
        with litertlm_core.open_file(str(path), "rb") as stream:
            stream.seek(found[0].BeginOffset())
            data = stream.read(found[0].EndOffset() - found[0].BeginOffset())
        if len(data) != found[0].EndOffset() - found[0].BeginOffset():
            raise ValueError("section runs past the end of the file")
        return data
    except (ValueError, IndexError, OSError) as exc:
        raise EdgepackError(f"{path}: not a readable .litertlm ({str(exc)[:160] or type(exc).__name__}); it is "
                            "truncated or corrupt — re-export it with --force") from None


@register
class LitertLmRunner(Runner):
    name = "litertlm"
    formats = ("litertlm",)

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("ai_edge_litert", "litert_lm", "litert_lm_builder")

    @classmethod
    def notes(cls) -> str:
        return "logits from the bundle's .tflite (Interpreter); validate and bench also run LiteRT-LM's engine"

    def _load_model(self, artifact: Artifact) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        from edgepack.runtime.litert import choose_kernels

        self.path = artifact.files[0]
        self.info = read_model_info(self.path.parent, "android")
        model = tflite_section(self.path)
        # XNNPACK as LiteRT-LM runs it, unless its packed copies would not fit (then the built-in kernels: the
        # logits differ by their rounding, and the engine check allows for it, BUILTIN_NEAR_TIE)
        self.kernels, self.kernels_why = choose_kernels(self.path, 2, blockwise=artifact.variant.endswith("int4"),
                                                        size=len(model), per_signature=PACKED_PER_SIGNATURE)
        resolver = (OpResolverType.AUTO if self.kernels == "xnnpack"
                    else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        try:
            with quiet_stderr():
                self.interpreter = Interpreter(model_content=model, num_threads=cpu_threads(),
                                               experimental_op_resolver_type=resolver)
        except (ValueError, RuntimeError) as exc:
            raise EdgepackError(f"{self.path}: LiteRT cannot load the model inside ({str(exc).strip()[:160]}); "
                                "re-export it with --force") from None
        self.steps = self.info["prefill_length"]
        names = set(self.interpreter.get_signature_list())
        if names != {f"prefill_{self.steps}", "decode"}:
            raise EdgepackError(f"{self.path}: signatures {sorted(names)}, expected prefill_{self.steps} and decode; "
                                "re-export it")
        self.prefill_sig = self.interpreter.get_signature_runner(f"prefill_{self.steps}")
        self.decode_sig = self.interpreter.get_signature_runner("decode")
        self.capacity = self.info["context_length"]
        self.reset()

    def reset(self) -> None:
        layers, sig = self.info["num_layers"], self.info["signatures"]["decode"]["inputs"]
        shape = sig["kv_cache_k_0"]["shape"]
        self.caches = {f"kv_cache_{kind}_{i}": np.zeros(shape, np.float32) for kind in "kv" for i in range(layers)}
        self.length = 0

    def _check_room(self, count: int) -> None:
        if self.length + count > self.capacity:
            raise EdgepackError(f"{self.artifact.key}: {self.length + count} tokens exceed the context length "
                                f"{self.capacity}; raise context_length in targets.toml and re-export")

    def _run(self, signature, tokens: np.ndarray, positions: np.ndarray) -> dict:
        out = signature(tokens=tokens, input_pos=positions, **self.caches)
        self.caches = {name: out[name] for name in self.caches}
        return out

    def _free_interpreter(self) -> None:
        """Drop the interpreter and its packed weights (the next prefill loads them again)."""
        import gc

        self.interpreter = self.prefill_sig = self.decode_sig = None
        self.caches = {}
        gc.collect()

    def prefill(self, ids: list[int]) -> np.ndarray:
        """As LiteRT-LM: all but the last token in prefill chunks (padding at position 0), the last through decode."""
        if self.interpreter is None:
            self._load_model(self.artifact)
        self.reset()
        ids = [int(t) for t in ids]
        self._check_room(len(ids))
        head = ids[:-1]
        for start in range(0, len(head), self.steps):
            chunk = head[start:start + self.steps]
            tokens, positions = np.zeros((1, self.steps), np.int32), np.zeros(self.steps, np.int32)
            tokens[0, :len(chunk)] = chunk
            positions[:len(chunk)] = np.arange(start, start + len(chunk))
            self._run(self.prefill_sig, tokens, positions)
        self.length = len(head)
        return self.decode(ids[-1])

    def decode(self, token: int) -> np.ndarray:
        self._check_room(1)
        out = self._run(self.decode_sig, np.array([[token]], np.int32), np.array([self.length], np.int32))
        self.length += 1
        return out["logits"].reshape(-1)

    def speed_note(self) -> str | None:  # per artifact: which kernels ran it
        return None if self.kernels == "xnnpack" else f"TFLite's built-in kernels, not XNNPACK: {self.kernels_why}"

    # --- LiteRT-LM's engine -----------------------------------------------------------------------------
    def _engine(self, benchmark: bool = False):
        from litert_lm import Backend, Engine, LogSeverity, set_min_log_severity

        set_min_log_severity(LogSeverity.ERROR)  # its INFO lines (accelerators, delegates) would fill the terminal

        try:
            with quiet_stderr():
                return Engine(str(self.path), backend=Backend.CPU(), max_num_tokens=self.capacity,
                              enable_benchmark=benchmark)
        except RuntimeError as exc:
            raise EdgepackError(f"{self.path}: LiteRT-LM cannot load this bundle ({exc}); re-export it") from None

    def engine_metrics(self, prompts: list[list[int]]) -> dict:
        """LiteRT-LM's greedy text for each chat prompt against this runner's on the same .tflite. The runner's
        tokens come first and its interpreter is freed before the engine loads: the engine packs the same weights
        for XNNPACK again, and the 1.24B int8 bundle's interpreter and engine side by side passed 16.4 GB."""
        from litert_lm import SamplerConfig

        eos = self.eos_ids()
        runs = []
        for ids in prompts:
            mine, margins = [], []
            logits = self.prefill(list(ids))
            for _ in range(ENGINE_TOKENS):
                top = np.sort(logits)[-2:]
                token = int(np.argmax(logits))
                margins.append(float(top[1] - top[0]))
                if token in eos:
                    break
                mine.append(token)
                logits = self.decode(token)
            runs.append((ids, mine, margins))
        self._free_interpreter()
        engine = self._engine()
        equal, shown = 0, []
        for ids, mine, margins in runs:
            text = self.tokenizer.decode(ids)
            with quiet_stderr():
                if engine.tokenize(text) != list(ids):
                    raise EdgepackError(f"{self.path}: LiteRT-LM tokenizes the prompt differently from the source "
                                        "tokenizer; re-export it")
                session = engine.create_session(apply_prompt_template=False, max_output_tokens=ENGINE_TOKENS,
                                                sampler_config=SamplerConfig(top_k=1, temperature=0.0))
                session.run_prefill([text])
                got = session.run_decode().texts[0]
                session.close()
            want = self.tokenizer.decode(mine)  # the engine writes special tokens' text too
            # the engine's C API returns a C string: a generated NUL byte (random tiny models make them) ends it
            got, want = got.split("\x00")[0], want.split("\x00")[0]
            if got == want:
                equal += 1
                continue
            # where the texts part: the first generated token whose text is no longer a prefix of the engine's
            n = next((k for k in range(1, len(mine) + 1) if not got.startswith(self.tokenizer.decode(mine[:k]))),
                     len(mine))
            margin = margins[n - 1] if n - 1 < len(margins) else float("nan")
            tie = NEAR_TIE if self.kernels == "xnnpack" else BUILTIN_NEAR_TIE
            equal += margin < tie
            shown.append(f"prompt {len(shown) + 1}: differs at token {n} (runner's top-2 margin {margin:.3f}"
                         f"{'' if self.kernels == 'xnnpack' else '; runner on the built-in kernels'})")
        del engine
        return {"engine_greedy": equal / len(prompts), "engine_notes": shown}

    def engine_bench(self, prompt: str, new_tokens: int, runs: int) -> dict:
        """LiteRT-LM's own timing (its benchmark info) of a Conversation answering the prompt through the bundle's
        chat template, stop tokens suppressed so every run decodes new_tokens: TTFT and decode tokens/s, the median
        of `runs` after a warm-up."""
        import statistics

        from litert_lm import SamplerConfig, SuppressTokensConfig

        self._free_interpreter()  # as in engine_metrics: not both copies of the weights at once
        engine = self._engine(benchmark=True)
        infos = []
        for _ in range(runs + 1):
            with quiet_stderr():
                conversation = engine.create_conversation(sampler_config=SamplerConfig(top_k=1, temperature=0.0))
                conversation.send_message(prompt, max_output_tokens=new_tokens,
                                          suppress_tokens_config=SuppressTokensConfig(sorted(self.eos_ids())))
                infos.append(conversation.get_benchmark_info())
                conversation.close()
        infos = infos[1:]
        return {"name": "LiteRT-LM (litert-lm-api, CPU)",
                "ttft_s": round(statistics.median(i.time_to_first_token_in_second for i in infos), 4),
                "decode_tok_s": round(statistics.median(i.last_decode_tokens_per_second for i in infos), 2),
                "decode_tokens": infos[-1].last_decode_token_count}
