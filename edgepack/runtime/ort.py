"""web and android (ONNX Mobile) runner: onnxruntime on CPU, the KV cache kept in onnxruntime's own buffers.

Each step binds the previous step's present.* OrtValues as the next step's past_key_values.* through IOBinding,
so the cache never passes through NumPy; only the last position's logits are copied out. .onnx and .ort files
load the same way.
"""

from __future__ import annotations

import numpy as np

from edgepack.artifacts import Artifact, read_manifest
from edgepack.errors import EdgepackError
from edgepack.native import cpu_threads, modules_missing
from edgepack.runtime.base import Runner, register

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def open_session(path, threads: int | None = None):
    """An onnxruntime CPU session for path, or one clear error when the file is not a loadable model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Fold DequantizeLinear on weights into plain float initializers (q4dq), as the page asks onnxruntime-web to;
    # without it onnxruntime would fuse them back into MatMulNBits and compute differently from the browser.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, …)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgepackError(f"{path}: onnxruntime cannot load this model ({first[:200]}); it is truncated or "
                            "corrupt — re-export it with --force") from None


@register
class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    formats = ("onnx", "onnx-mobile")

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("onnxruntime")

    def _load_model(self, artifact: Artifact) -> None:
        self.session = open_session(artifact.files[0])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        outputs = [o.name for o in self.session.get_outputs()]
        missing = {"input_ids", "attention_mask"} - set(inputs) or set(self.present_names) - set(outputs)
        if missing or "logits" not in outputs:
            raise EdgepackError(f"{artifact.files[0]}: not an edgepack decoder graph (missing {sorted(missing)[:3]}); "
                                "re-export it")
        first = inputs[self.past_names[0]]
        self.kv_dtype = _NUMPY[first.type]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.has_positions = "position_ids" in inputs
        manifest = read_manifest(artifact.dir) or {}
        self.capacity = manifest.get("context_length", 2048)
        self.reset()

    def reset(self) -> None:
        self.past = None
        self.length = 0

    def _step(self, ids: list[int]) -> np.ndarray:
        total = self.length + len(ids)
        if total > self.capacity:
            raise EdgepackError(f"{self.artifact.key}: {total} tokens exceed the context length {self.capacity}; "
                                "raise context_length in targets.toml and re-export")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self.has_positions:
            binding.bind_cpu_input("position_ids", np.arange(self.length, total, dtype=np.int64)[None])
        if self.past is None:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            for name in self.past_names:
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self.past_names, self.past):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        self.past = values[1:]
        self.length = total
        return values[0].numpy()[0, -1].astype(np.float32)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return self._step([int(t) for t in ids])

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)])

    def weight_bytes(self) -> int:
        """Bytes read per decoded token: the file less an embedding table only a Gather reads (one row a token)."""
        import onnx

        path = self.artifact.files[0]
        if path.suffix != ".onnx":  # an .ort file: no ONNX protobuf to read; count the whole file
            return self.artifact.bytes
        model = onnx.load(str(path), load_external_data=False)
        readers: dict[str, set[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.op_type)
        size = lambda t: next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))  # noqa: E731
        gathered = sum(size(t) for t in model.graph.initializer if readers.get(t.name) == {"Gather"}
                       and len(t.dims) == 2 and t.dims[0] > 1024)
        return self.artifact.bytes - gathered
