"""ios runner: Core ML itself on macOS (MLModel + make_state + predict); elsewhere edgepack's MIL interpreter.

Both run the saved .mlpackage with the interface in model_info.json: input_ids [1, T] int32, causal_mask
[1, 1, T, E] fp16, the KV cache as state. On Linux the numbers come from runtime/mil.py (the program's own ops in
NumPy, fp16 emulated): the same parity metrics, computed without a Mac.
"""

from __future__ import annotations

import contextlib
import io
import platform
from pathlib import Path

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.model_info import MODEL_INFO, read_model_info
from edgepack.native import modules_missing, quiet_stderr
from edgepack.runtime.base import Runner, register

MASKED = np.float16(-65504.0)


def package_of(path: Path) -> Path:
    """The .mlpackage folder a manifest file path lies in."""
    for parent in (path, *path.parents):
        if parent.suffix == ".mlpackage":
            return parent
    raise EdgepackError(f"{path}: not inside a .mlpackage; re-export the ios target")


def core_ml_available() -> bool:
    return platform.system() == "Darwin"


def import_coremltools():
    """coremltools, imported quietly (on Linux it prints that its native Core ML proxies are missing)."""
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        import coremltools

    return coremltools


def check_package(package: Path, info: dict) -> dict:
    """Read a saved .mlpackage's spec and say what is wrong with it, in one line, or return its facts."""
    ct = import_coremltools()
    if not (package / "Manifest.json").is_file():
        raise EdgepackError(f"{package}: not a .mlpackage (no Manifest.json); re-export it with --force")
    weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    if not weights.is_file():
        raise EdgepackError(f"{package}: its weights file is missing ({weights.name}); re-export it with --force")
    try:
        spec = ct.utils.load_spec(str(package))
    except Exception as exc:  # protobuf's DecodeError and coremltools' own errors
        raise EdgepackError(f"{package}: cannot read its Core ML spec ({str(exc).splitlines()[0][:160]}); "
                            "re-export it with --force") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise EdgepackError(f"{package}: not an ML Program; re-export it with --force")
    described = spec.description
    inputs = {i.name for i in described.input}
    states = {s.name for s in described.state}
    if inputs != set(info["inputs"]) or states != set(info["states"]):
        raise EdgepackError(f"{package}: inputs {sorted(inputs)} / states {sorted(states)} differ from "
                            f"{MODEL_INFO}; re-export the ios target")
    return {"spec": spec, "weights": weights}


def load_checked(package: Path, info: dict):
    """spec, MIL program and structure facts of a saved .mlpackage; one error line when its structure is wrong."""
    facts = check_package(package, info)  # imports coremltools quietly first (its Linux import prints 9 lines)
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = facts["spec"]
    try:
        program = milproto.load(spec, spec.specificationVersion, str(facts["weights"].parent))
    except Exception as exc:  # a weights file that does not hold what the spec points at
        raise EdgepackError(f"{package}: cannot read its ML Program ({str(exc).splitlines()[0][:160]}); "
                            "re-export it with --force") from None
    found = structure(spec, program, info)
    if found["problems"]:
        raise EdgepackError(f"{package}: {found['problems'][0]}; re-export the ios target")
    return spec, program, found


IOS18_SPEC = 9  # Core ML specification version of iOS 18 / macOS 15 (states need it)
ARRAY_TYPES = {"int32": 131104, "float16": 65552, "float32": 65568}  # ArrayFeatureType.ArrayDataType values


def structure(spec, program, info: dict) -> dict:
    """What the saved spec says, checked against model_info.json: deployment target, inputs / outputs / states
    (names, dtypes, shapes), every op inside the iOS 18 opset, and the weight formats actually stored."""
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    ct = import_coremltools()
    problems = []
    if spec.specificationVersion != IOS18_SPEC:
        problems.append(f"specification version {spec.specificationVersion}, expected {IOS18_SPEC} (iOS 18)")
    described = spec.description
    for kind, features in (("inputs", described.input), ("outputs", described.output)):
        found = {f.name: f.type.multiArrayType.dataType for f in features}
        wanted = {name: ARRAY_TYPES[facts["dtype"]] for name, facts in info[kind].items()}
        if found != wanted:
            problems.append(f"{kind} {found} differ from model_info.json {wanted}")
    states = {s.name: (list(s.type.stateType.arrayType.shape), s.type.stateType.arrayType.dataType) for s in described.state}
    wanted = {name: (facts["shape"], ARRAY_TYPES[facts["dtype"]]) for name, facts in info["states"].items()}
    if states != wanted:
        problems.append(f"states {states} differ from model_info.json {wanted}")
    ops = [op for op in program.functions["main"].operations]
    # coreml_update_state is coremltools' name for the iOS 18 write_state + read_state pair it serializes
    outside = sorted({op.op_type for op in ops if op.op_type != "coreml_update_state"
                      and ct.target.iOS18 not in SSAOpRegistry.core_ops.get(op.op_type, {})})
    if outside:
        problems.append(f"ops outside the iOS 18 opset: {', '.join(outside)}")
    weights = {}
    for op in ops:
        if op.op_type.startswith("constexpr_"):
            kind = types.builtin_to_string(op.inputs["data"].dtype) if "data" in op.inputs else "?"
            key = f"{op.op_type}({kind})"
            weights[key] = weights.get(key, 0) + 1
    fused = sum(op.op_type == "scaled_dot_product_attention" for op in ops)
    return {"problems": problems, "op_types": len({op.op_type for op in ops}), "quantized_weights": weights,
            "fused_attention": fused}


def causal_mask(past: int, steps: int) -> np.ndarray:
    """[1, 1, T, E]: query t (at slot past + t) sees slots 0 … past + t."""
    end = past + steps
    visible = np.arange(end)[None, :] <= (past + np.arange(steps))[:, None]
    return np.where(visible, np.float16(0), MASKED).astype(np.float16)[None, None]


@register
class CoreMLRunner(Runner):
    name = "coreml"
    formats = ("coreml",)

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("coremltools")

    @classmethod
    def speed_unmeasurable(cls) -> str | None:
        if core_ml_available():
            return None
        return "Core ML speed needs macOS (here the MIL interpreter checks numbers; it is not a runtime)"

    @classmethod
    def notes(cls) -> str:
        if core_ml_available():
            return "runs on Core ML (macOS)"
        return "Linux: validated through edgepack's MIL interpreter (NumPy, fp16 emulated); Core ML runs on macOS"

    def _load_model(self, artifact: Artifact) -> None:
        self.info = read_model_info(artifact.dir, "ios")
        # one package, or a chain of them (model_info.json "chunks"), each with its own interface and state
        found = {p.name: p for p in dict.fromkeys(package_of(f) for f in artifact.files)}
        names = self.info["files"].get(artifact.variant)
        names = names if isinstance(names, list) else list(found)[:1]
        interfaces = self.info.get("chunks", [self.info])
        missing = [n for n in names if n not in found]
        if missing or len(names) != len(interfaces):
            raise EdgepackError(f"{artifact.key}: packages {missing or names} are not the {len(interfaces)} that "
                                f"{MODEL_INFO} lists; re-export the ios target")
        self.packages = [found[n] for n in names]
        loaded = [load_checked(p, i) for p, i in zip(self.packages, interfaces)]
        self.structures = [facts for _, _, facts in loaded]
        self.capacity = self.info["context_length"]
        if core_ml_available():
            ct = import_coremltools()
            self.models = [ct.models.MLModel(str(p), compute_units=ct.ComputeUnit.CPU_AND_GPU) for p in self.packages]
            self.interpreters = None
        else:
            from edgepack.runtime.mil import MILInterpreter

            self.interpreters = [MILInterpreter(program) for _, program, _ in loaded]
        self.reset()

    def reset(self) -> None:
        self.length = 0
        if self.interpreters is not None:
            for interpreter in self.interpreters:
                interpreter.reset()
        else:
            self.states = [model.make_state() for model in self.models]

    def _step(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.capacity:
            raise EdgepackError(f"{self.artifact.key}: {self.length + len(ids)} tokens exceed the context length "
                                f"{self.capacity} (the state's shape); raise context_length in targets.toml and re-export")
        mask = causal_mask(self.length, len(ids))
        x, name = np.array([ids], np.int32), "input_ids"
        for i in range(len(self.packages)):
            inputs = {name: x, "causal_mask": mask}
            if self.interpreters is not None:
                outputs = self.interpreters[i].run(inputs)
            else:
                outputs = self.models[i].predict(inputs, state=self.states[i])
            if "logits" in outputs:
                logits = outputs["logits"]
            else:  # the next package of a chain takes this one's hidden states
                x, name = np.asarray(outputs["hidden_out"], dtype=np.float16), "hidden_in"
        self.length += len(ids)
        return np.asarray(logits, dtype=np.float32)[0, -1]

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return self._step([int(t) for t in ids])

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)])

    def compatibility(self) -> dict[str, str]:
        counts: dict[str, int] = {}
        for facts in self.structures:
            for kind, n in facts["quantized_weights"].items():
                counts[kind] = counts.get(kind, 0) + n
        weights = ", ".join(f"{n}× {k}" for k, n in counts.items()) or "fp16 constants"
        chain = f"a chain of {len(self.packages)} packages, " if len(self.packages) > 1 else ""
        op_types = max(facts["op_types"] for facts in self.structures)
        fused = sum(facts["fused_attention"] for facts in self.structures)
        facts = {"spec": f"iOS 18 ML Program, {chain}{op_types} op types all in the iOS 18 opset, "
                         f"inputs/outputs/states as model_info.json; weights: {weights}",
                 "attention": f"{fused}× iOS 18 fused scaled_dot_product_attention"}
        if core_ml_available():
            return facts | {"Core ML": "ran on this Mac"}
        return facts | {"Core ML": "not run here (needs macOS); numbers from edgepack's MIL interpreter, fp16 emulated"}
