"""android runner, LiteRT part: ai-edge-litert's Interpreter (XNNPACK, threads = cores) on the .tflite's signatures.

The graph reads the KV cache and returns only this step's keys and values (see model_info.json, written by the
exporter); the runner writes them straight into the cache inputs' own tensor buffers of every signature, so a
decode step copies one token's keys, not the cache. A prompt longer than the prefill length is prefilled in
chunks. Decode runs the shortest decode_<S> signature whose S slots hold the chat so far (S = 256, 512, 1024),
then `decode` (the whole context).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.model_info import read_model_info
from edgepack.native import cpu_threads, modules_missing, quiet_stderr
from edgepack.runtime.base import Runner, register
from edgepack.tools import LEGACY_RUNTIME, legacy_runtime_python



KERNELS_ENV = "EDGEPACK_LITERT_KERNELS"  # xnnpack | builtin | auto (the default)
XNNPACK_SHARE = 0.6  # of the memory available now, the most XNNPACK's packed weights may take


def choose_kernels(path, signatures: int, blockwise: bool = False, size: int | None = None,
                   per_signature: float = 1.0) -> tuple[str, str | None]:
    """("xnnpack" | "builtin", why builtin). XNNPACK, the Interpreter's default delegate, packs the weights of every
    signature for itself when the first one is allocated: resident 6.0× the .tflite with five signatures (494M fp32,
    1.98 GB → 11.97 GB), 30 GB for the 1.24B model's. TFLite's built-in kernels read the weights from the mapped file
    (the same 494M: 2.08 GB resident, a decode step 0.14 s against XNNPACK's 0.06 s). So XNNPACK when its copies fit
    in XNNPACK_SHARE of the memory available, the built-in kernels otherwise, and $EDGEPACK_LITERT_KERNELS forces
    either. XNNPACK's weight cache (one packed copy, mapped) is on LiteRT's CompiledModel, whose Python binding cannot
    yet take the runner's cache buffers (README, "android").
    blockwise (int4's blocks of 32): always XNNPACK; the built-in kernels compute them wrong (the default model's int4:
    every argmax different from XNNPACK's, max|Δ| 10.6; fp32 5.7e-5 and int8 0.48 with the same argmax).
    size: the model's bytes when path holds more than the model (a .litertlm's TFLite section); per_signature: what
    XNNPACK packs per signature, in model sizes (a .litertlm's int8 weights: measured 3.3, below)."""
    import psutil

    forced = os.environ.get(KERNELS_ENV, "auto")
    if forced not in ("xnnpack", "builtin", "auto"):
        raise EdgepackError(f"${KERNELS_ENV}={forced}: not a choice; use xnnpack, builtin or auto")
    if blockwise:
        return "xnnpack", None
    if forced != "auto":
        return forced, f"${KERNELS_ENV}={forced}" if forced == "builtin" else None
    need = (signatures * per_signature + 1) * (size or os.path.getsize(path))  # measured 6.0–6.1× with 5 signatures
    available = psutil.virtual_memory().available
    if need <= XNNPACK_SHARE * available:
        return "xnnpack", None
    return "builtin", (f"XNNPACK would pack about {need / 1e9:.1f} GB of weights ({signatures} signatures), more than "
                       f"{XNNPACK_SHARE:.0%} of the {available / 1e9:.1f} GB available")


def open_interpreter(path, threads: int | None = None, kernels: str = "xnnpack"):
    """An ai-edge-litert Interpreter for path, or one clear error when the file is not a loadable model."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if kernels == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with quiet_stderr():
            return Interpreter(model_path=str(path), num_threads=threads or cpu_threads(),
                               experimental_op_resolver_type=resolver)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgepackError(f"{path}: LiteRT cannot load this model ({first[:200]}); it is truncated or corrupt — "
                            "re-export it with --force") from None


class _Signature:
    """One signature's subgraph: small inputs set per call, cache inputs as views of the interpreter's buffers."""

    def __init__(self, interpreter, name: str, layers: int):
        self.wrapper = interpreter._interpreter  # the C++ wrapper: per-subgraph tensors without per-call copies
        signature = interpreter._get_full_signature_list()[name]
        self.inputs, self.outputs = signature["inputs"], signature["outputs"]
        self.index = self.wrapper.GetSubgraphIndexFromSignature(name)
        self.wrapper.AllocateTensors(self.index)
        view = lambda n: self.wrapper.tensor(self.wrapper, self.inputs[n], self.index)
        self.k = [view(f"k_{i}") for i in range(layers)]
        self.v = [view(f"v_{i}") for i in range(layers)]
        for cache in self.k + self.v:  # fresh buffers hold whatever memory held; masked slots must still be finite
            cache.fill(0)
        self.steps = int(self.wrapper.TensorSize(self.inputs["tokens"], self.index)[1])

    def __call__(self, **small) -> dict[str, np.ndarray]:
        for name, value in small.items():
            self.wrapper.SetTensor(self.inputs[name], value, self.index)
        self.wrapper.Invoke(self.index)
        return {name: self.wrapper.GetTensor(i, self.index) for name, i in self.outputs.items()}


@register
class LiteRTRunner(Runner):
    name = "litert"
    formats = ("tflite",)

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("ai_edge_litert")

    @classmethod
    def notes(cls) -> str:
        state = "ready" if legacy_runtime_python(build=False) else "made on first need"
        return f"validate also checks each .tflite on {LEGACY_RUNTIME}: {state}"

    def _load_model(self, artifact: Artifact) -> None:
        self.info = read_model_info(artifact.dir, "android")
        windows = self.info.get("decode_windows", {})
        self.kernels, self.kernels_why = choose_kernels(artifact.files[0], len(windows) + 2,
                                                        blockwise=artifact.variant == "int4")
        self.interpreter = open_interpreter(artifact.files[0], kernels=self.kernels)
        signatures = self.interpreter.get_signature_list()
        if set(signatures) != {"prefill", "decode", *windows}:
            raise EdgepackError(f"{artifact.files[0]}: signatures {sorted(signatures)}, expected prefill, decode "
                                f"{' '.join(windows)} (model_info.json); re-export it")
        layers = self.info["num_layers"]
        self.prefill_sig = _Signature(self.interpreter, "prefill", layers)
        # (slots read, signature), smallest first: decode_<S> reads S slots, decode all of them
        self.decode_sigs = sorted([(w, _Signature(self.interpreter, name, layers)) for name, w in windows.items()],
                                  key=lambda pair: pair[0])
        self.decode_sigs.append((self.info["context_length"], _Signature(self.interpreter, "decode", layers)))
        self.capacity = self.info["context_length"]
        self.reset()

    @contextlib.contextmanager
    def whole_cache(self):
        """Decode through `decode` only (every slot read), as before the short signatures: bench's comparison."""
        short = self.decode_sigs
        self.decode_sigs = short[-1:]
        try:
            yield
        finally:
            self.decode_sigs = short

    def compatibility(self) -> dict[str, str]:
        return {LEGACY_RUNTIME: legacy_runtime_verdict(self.artifact.files[0])}

    def speed_note(self) -> str | None:  # per artifact: which kernels ran it
        return None if self.kernels == "xnnpack" else f"TFLite's built-in kernels, not XNNPACK: {self.kernels_why}"

    def reset(self) -> None:
        self.length = 0  # slots at or after `length` are masked out by the graph (and finite): no need to clear them

    def _store(self, out: dict[str, np.ndarray], count: int) -> None:
        """Write this step's keys and values into both signatures' cache buffers at slots length..length+count."""
        span = slice(self.length, self.length + count)
        for sig in (self.prefill_sig, *(sig for _, sig in self.decode_sigs)):
            for i in range(len(sig.k)):
                sig.k[i][:, :, span] = out["k_new"][i][:, :, :count]
                sig.v[i][:, :, span] = out["v_new"][i][:, :, :count]
        self.length += count

    def _check_room(self, count: int) -> None:
        if self.length + count > self.capacity:
            raise EdgepackError(f"{self.artifact.key}: {self.length + count} tokens exceed the context length "
                                f"{self.capacity}; raise context_length in targets.toml and re-export")

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Chunks of the prefill length, each padded; the cache slots of padding are never stored."""
        self.reset()
        ids = [int(t) for t in ids]
        self._check_room(len(ids))
        steps = self.prefill_sig.steps
        for start in range(0, len(ids), steps):
            chunk = ids[start:start + steps]
            tokens = np.zeros((1, steps), np.int32)
            tokens[0, :len(chunk)] = chunk
            out = self.prefill_sig(tokens=tokens, position=np.array([start], np.int32),
                                   length=np.array([len(chunk)], np.int32))
            self._store(out, len(chunk))
        return out["logits"][0]

    def decode(self, token: int) -> np.ndarray:
        self._check_room(1)
        sig = next(sig for slots, sig in self.decode_sigs if self.length <= slots)  # the shortest that holds the chat
        out = sig(tokens=np.array([[token]], np.int32), position=np.array([self.length], np.int32))
        self._store(out, 1)
        return out["logits"][0]


# tflite-runtime 2.14 (2023), the package older apps and guides name, is built against NumPy 1.x, so it lives in
# its own small environment (edgepack.tools makes it on first need); this script runs there.
_LEGACY_CHECK = """
import sys
from tflite_runtime.interpreter import Interpreter
try:
    it = Interpreter(model_path=sys.argv[1])
    names = sorted(it.get_signature_list())
    for name in names:
        it.get_signature_runner(name)
        it._interpreter.AllocateTensors(it._interpreter.GetSubgraphIndexFromSignature(name))
    it._interpreter.Invoke(it._interpreter.GetSubgraphIndexFromSignature("decode"))  # every kernel runs once
    print("loads and runs; signatures " + ", ".join(names))
except Exception as exc:
    print("fails: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160])
"""


def legacy_runtime_verdict(path) -> str:
    """Whether tflite-runtime 2.14 loads a .tflite and allocates its signatures (op support), in a few words."""
    import subprocess

    python = legacy_runtime_python()
    if python is None:
        return "not checked (its environment cannot be created here)"
    done = subprocess.run([str(python), "-c", _LEGACY_CHECK, str(path)], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("loads", "fails"))]
    return lines[-1] if lines else f"fails: {(done.stderr.strip().splitlines() or ['no output'])[-1][:160]}"
