"""A small NumPy interpreter for Core ML ML Programs (MIL), so iOS artifacts are checked numerically on Linux.

Written by hand because no public tool evaluates a converted Core ML program without a Mac: coremltools reads
and writes programs anywhere, but only Core ML (macOS) runs them. The program comes from the saved .mlpackage
(coremltools' milproto loader), so what is checked is exactly the file an app ships.

It knows exactly the ops edgepack's decoders convert to (OPS below); any other op fails loudly with its name,
never skipped. fp16 is emulated: values typed fp16 are rounded to fp16 after every op; arithmetic runs in fp32
(as Core ML's GPU accumulates matmuls in fp32). Constants and constexpr-dequantized weights are materialized
once, as fp32 holding their fp16 values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.errors import EdgepackError


class UnknownOp(EdgepackError):
    """A MIL op this interpreter does not implement."""


def _axes(value, ndim: int) -> tuple[int, ...]:
    return tuple(int(a) % ndim for a in np.atleast_1d(value))


def _slices(x, begin, end, stride, begin_mask, end_mask, squeeze_mask=None):
    index = []
    for i in range(x.ndim):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        s = 1 if stride is None else int(stride[i])
        index.append(int(begin[i]) if squeeze_mask is not None and squeeze_mask[i] else slice(b, e, s))
    return tuple(index)


def _slice_by_index(a):
    return a["x"][_slices(a["x"], a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                          a.get("squeeze_mask"))]


def _slice_update(a):
    out = a["x"].copy()
    out[_slices(out, a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                a.get("squeeze_mask"))] = a["update"]
    return out


def _blockwise_shift_scale(a):
    """iOS 18 constexpr: data (int4/int8/…) → scale · (data − offset), scale/offset repeated over each block."""
    data = a["data"].astype(np.float32)
    def expand(t):
        for axis in range(data.ndim):
            t = np.repeat(t, data.shape[axis] // t.shape[axis], axis=axis)
        return t
    offset = expand(a["offset"].astype(np.float32)) if a.get("offset") is not None else 0.0
    return expand(a["scale"].astype(np.float32)) * (data - offset)


def _gather(a):
    return np.take(a["x"], a["indices"].astype(np.int64), axis=int(a.get("axis", 0)))


def _softmax(a):
    x = a["x"]
    axis = int(a.get("axis", -1))
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _cast(a):
    kinds = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
             "uint16": np.uint16, "uint8": np.uint8, "bool": bool}
    return a["x"].astype(kinds[str(a["dtype"])])


def _gelu(a):
    """MIL gelu: EXACT (erf), TANH_APPROXIMATION (Gemma's gelu_pytorch_tanh) or SIGMOID_APPROXIMATION."""
    x, mode = a["x"], str(a.get("mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _sdpa(a):
    """iOS 18 scaled_dot_product_attention: softmax(Q·Kᵀ / √D + mask) · V, mask bool (True = attend) or additive.
    Evaluated in fp32 and rounded once at the output, as a fused kernel keeps its intermediates."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (np.where(mask, 0.0, -np.inf) if mask.dtype == bool else mask)
    return _softmax({"x": scores}) @ v


def _matmul(a):
    x, y = a["x"], a["y"]
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return x @ y


# op type → f(arguments) ; the state ops are handled by the interpreter itself
OPS = {
    "add": lambda a: a["x"] + a["y"],
    "sub": lambda a: a["x"] - a["y"],
    "mul": lambda a: a["x"] * a["y"],
    "real_div": lambda a: a["x"] / a["y"],
    "pow": lambda a: np.power(a["x"], a["y"]),
    "rsqrt": lambda a: 1.0 / np.sqrt(a["x"] + a.get("epsilon", 1e-12)),
    "maximum": lambda a: np.maximum(a["x"], a["y"]),
    "minimum": lambda a: np.minimum(a["x"], a["y"]),
    "equal": lambda a: a["x"] == a["y"],
    "not_equal": lambda a: a["x"] != a["y"],
    "greater": lambda a: a["x"] > a["y"],
    "greater_equal": lambda a: a["x"] >= a["y"],
    "less": lambda a: a["x"] < a["y"],
    "less_equal": lambda a: a["x"] <= a["y"],
    "logical_and": lambda a: np.logical_and(a["x"], a["y"]),
    "logical_or": lambda a: np.logical_or(a["x"], a["y"]),
    "logical_not": lambda a: np.logical_not(a["x"]),
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "sqrt": lambda a: np.sqrt(a["x"]),
    "inverse": lambda a: 1.0 / (a["x"] + a.get("epsilon", 1e-4)),  # MIL adds epsilon (default 1e-4)
    "abs": lambda a: np.abs(a["x"]),
    "clip": lambda a: np.clip(a["x"], a["alpha"], a["beta"]),
    "reduce_max": lambda a: a["x"].max(axis=_axes(a["axes"], a["x"].ndim), keepdims=bool(a.get("keep_dims"))),
    "exp": lambda a: np.exp(a["x"]),
    "cos": lambda a: np.cos(a["x"]),
    "sin": lambda a: np.sin(a["x"]),
    "silu": lambda a: a["x"] / (1.0 + np.exp(-a["x"])),
    "gelu": _gelu,
    "tanh": lambda a: np.tanh(a["x"]),
    "reduce_mean": lambda a: a["x"].mean(axis=_axes(a["axes"], a["x"].ndim), keepdims=bool(a.get("keep_dims"))),
    "reduce_sum": lambda a: a["x"].sum(axis=_axes(a["axes"], a["x"].ndim), keepdims=bool(a.get("keep_dims"))),
    "linear": lambda a: a["x"] @ a["weight"].T + (a["bias"] if a.get("bias") is not None else 0.0),
    "matmul": _matmul,
    "softmax": _softmax,
    "scaled_dot_product_attention": _sdpa,
    "gather": _gather,
    "concat": lambda a: np.concatenate([np.atleast_1d(v) for v in a["values"]], axis=int(a["axis"])),
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "reshape": lambda a: a["x"].reshape([int(d) for d in a["shape"]]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda a: np.expand_dims(a["x"], _axes(a["axes"], a["x"].ndim + len(np.atleast_1d(a["axes"])))),
    "squeeze": lambda a: np.squeeze(a["x"], axis=_axes(a["axes"], a["x"].ndim) if a.get("axes") is not None else None),
    "tile": lambda a: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "cast": _cast,
    "shape": lambda a: np.array(a["x"].shape, dtype=np.int32),
    "range_1d": lambda a: np.arange(a["start"], a["end"], a["step"]),
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
}
STATE_OPS = ("read_state", "coreml_update_state")
# Ops that only move values: their fp16 outputs hold fp16 inputs' values already, so no rounding pass (which
# would copy, e.g., a layer's whole cache slice every step).
MOVES = {"slice_by_index", "reshape", "transpose", "expand_dims", "squeeze", "concat", "tile", "gather", "slice_update"}


def _np_type(var):
    from coremltools.converters.mil.mil import types

    dtype = var.dtype
    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        return types.nptype_from_builtin(dtype)
    return None


def load_program(package: Path):
    """The ML Program of a saved .mlpackage, read with coremltools' own loader (works on Linux)."""
    from edgepack.native import import_quietly

    import_quietly("coremltools")  # its Linux import prints that Core ML's native proxies are missing
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return spec, milproto.load(spec, spec.specificationVersion, str(weights))


class MILInterpreter:
    """Evaluate one function of a MIL program on NumPy inputs, with its states kept between calls."""

    def __init__(self, program, function: str = "main"):
        self.function = program.functions[function]
        self.ops = list(self.function.operations)
        unknown = sorted({op.op_type for op in self.ops} - set(OPS) - set(STATE_OPS) - {"const"})
        if unknown:
            raise UnknownOp(f"MIL op(s) {', '.join(unknown)} not implemented by edgepack's interpreter; "
                            "add them to edgepack/runtime/mil.py (none is ever skipped)")
        self.consts: dict[str, np.ndarray] = {}
        self.states: dict[str, np.ndarray] = {}
        self.state_types: dict[str, np.dtype] = {}
        for name, var in self.function.inputs.items():
            from coremltools.converters.mil.mil import types

            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                self.state_types[name] = types.nptype_from_builtin(wrapped.get_primitive())
                self.states[name] = np.zeros(wrapped.get_shape(), dtype=np.float32)
        # A slice_update whose input (a state read, or the previous layer's slice_update of it) has no reader
        # after it runs is done in place: the functional form would copy the whole cache for every layer and step.
        self.kinds = {op.name: _np_type(op.outputs[0]) for op in self.ops}  # each op's output dtype, looked up once
        order = {id(op): i for i, op in enumerate(self.ops)}
        self.in_place = set()
        for i, op in enumerate(self.ops):
            x = op.inputs.get("x") if op.op_type == "slice_update" else None
            if x is not None and x.op is not None and x.op.op_type in ("read_state", "slice_update", "coreml_update_state") and all(
                    order[id(c)] < i for c in x.child_ops if c is not op) and x not in self.function.outputs:
                self.in_place.add(op.name)
        for op in self.ops:  # constants, and constexpr ops whose inputs are all constants: once
            if op.op_type == "const":
                self.consts[op.outputs[0].name] = self._stored(op.outputs[0].val, op.outputs[0])
            elif op.op_type.startswith("constexpr_"):
                args = {k: self._const_arg(v) for k, v in op.inputs.items()}
                self.consts[op.outputs[0].name] = self._stored(OPS[op.op_type](args), op.outputs[0])

    @staticmethod
    def _stored(value, var):
        value = np.asarray(value)
        kind = _np_type(var)
        if kind is not None and np.issubdtype(np.dtype(kind), np.floating):
            return value.astype(kind).astype(np.float32)  # the declared precision, held as fp32
        return value

    def _const_arg(self, var):
        if isinstance(var, (list, tuple)):
            return [self._const_arg(v) for v in var]
        if var.name in self.consts:
            return self.consts[var.name]
        return np.asarray(var.val) if var.val is not None else None

    def reset(self) -> None:
        for name in self.states:
            self.states[name][...] = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(self.consts)
        for name, value in inputs.items():
            env[name] = np.asarray(value).astype(np.float32) if np.asarray(value).dtype == np.float16 else value
        for name in self.states:
            env[name] = name  # a state input stands for its name; the state ops read and write self.states

        def value(var):
            if isinstance(var, (list, tuple)):
                return [value(v) for v in var]
            if var.name in env:
                return env[var.name]
            if var.val is not None:
                return np.asarray(var.val)
            raise EdgepackError(f"MIL interpreter: value {var.name} used before it is computed")

        with np.errstate(over="ignore"):  # the causal mask's -65504 plus a negative score is -inf in fp16, as on device
            return self._run(env, value)

    def _run(self, env, value):
        for op in self.ops:
            if op.op_type == "const" or op.outputs[0].name in self.consts:
                continue
            args = {k: value(v) for k, v in op.inputs.items()}
            if op.op_type == "read_state":  # the state itself (already fp16 values); only in-place updates write it
                env[op.outputs[0].name] = self.states[args["input"]]
                continue
            if op.op_type == "coreml_update_state":
                name = args["state"]
                if args["value"] is not self.states[name]:
                    self.states[name] = np.asarray(args["value"]).astype(self.state_types[name]).astype(np.float32)
                env[op.outputs[0].name] = self.states[name]
                continue
            elif op.name in self.in_place:
                x = args["x"]
                x[_slices(x, args["begin"], args["end"], args.get("stride"), args.get("begin_mask"),
                          args.get("end_mask"), args.get("squeeze_mask"))] = args["update"]
                env[op.outputs[0].name] = x
                continue
            else:
                result = OPS[op.op_type](args)
            out = op.outputs[0]
            kind = self.kinds[op.name]
            result = np.asarray(result)
            if kind is not None and not (op.op_type in MOVES and result.dtype == np.float32 and kind == np.float16):
                result = result.astype(kind)
                if kind == np.float16:
                    result = result.astype(np.float32)  # rounded to fp16, computed on in fp32
            env[out.name] = result
        return {var.name: env[var.name] for var in self.function.outputs}
