"""The one loader of targets.toml: which target builds which formats and variants, and what each must prove."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import EdgepackError

DEFAULT_TARGETS_FILE = Path(__file__).resolve().parent / "targets.toml"  # package data: the default matrix

# The vocabulary: every format, the target it belongs to, the runner that proves it and the variants it
# accepts, spelled the way each ecosystem spells them (transformers.js dtypes, Core ML, llama.cpp types).
FORMATS: dict[str, dict] = {
    "onnx": {
        "target": "web",
        "runner": "onnxruntime",
        "variants": ("fp32", "fp16", "q8", "q4", "q4f16", "q4dq", "int8"),
    },
    "onnx-mobile": {"target": "android", "runner": "onnxruntime", "variants": ("q4",)},
    "coreml": {"target": "ios", "runner": "coreml", "variants": ("fp16", "int4", "int8")},
    "tflite": {"target": "android", "runner": "litert", "variants": ("fp32", "int8", "int4")},
    # LiteRT-LM bundles (.litertlm) of the int8 / int4 .tflite in LiteRT-LM's signature convention
    "litertlm": {"target": "android", "runner": "litertlm", "variants": ("litertlm-int8", "litertlm-int4", "litertlm-fp32")},
    # ExecuTorch .pte, the same file in both mobile targets (named pte-* so variant names stay unique per target)
    "executorch": {"target": ("android", "ios"), "runner": "executorch", "variants": ("pte-fp32", "pte-8da4w")},
    # mlx-lm's folder layout; fp16 / bf16 weights, q8 / q4 MLX affine quantization (group 64, as mlx-lm's converter)
    "mlx": {"target": "mac", "runner": "mlx", "variants": ("fp16", "bf16", "q8", "q4")},
    "gguf": {
        "target": "cpu",
        "runner": "llama.cpp",
        "variants": (
            "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
            "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K",
        ),
    },
}
TARGETS = ("web", "ios", "android", "cpu", "mac")
EXECUTION_PROVIDERS = ("webgpu", "wasm")

# Parity checks a variant may be held to; each maps to one metric of edgepack.runtime.parity.
THRESHOLD_KEYS = {
    "max_abs_logit": "largest |logit difference| over the chat prompts",
    "max_kl": "mean KL(reference || artifact) per position",
    "min_top1": "teacher-forced top-1 agreement",
    "min_greedy": "fraction of chat prompts whose greedy answer equals the reference through end-of-turn",
    "max_ppl_ratio": "perplexity on the passage, artifact / reference",
    "min_engine_greedy": "fraction of chat prompts whose greedy text in the app's engine (LiteRT-LM) equals the "
                         "runner's on the same file (a difference at a < 0.1-logit near-tie counts as equal)",
}
_TARGET_KEYS = {"context_length", "execution_providers", *FORMATS}
_FORMAT_KEYS = {"runner", "variants", "thresholds"}


def format_targets(fmt: str) -> tuple[str, ...]:
    """The targets a format belongs to (one, or several for a format shared by targets)."""
    target = FORMATS[fmt]["target"]
    return (target,) if isinstance(target, str) else target


@dataclass(frozen=True)
class FormatSpec:
    name: str
    runner: str
    variants: tuple[str, ...]
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    context_length: int
    formats: dict[str, FormatSpec]
    execution_providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Targets:
    path: Path
    targets: dict[str, TargetSpec]

    def select(self, names: list[str] | None) -> list[TargetSpec]:
        """The targets named (or all of them for None / 'all'), in file order."""
        if not names or "all" in names:
            return list(self.targets.values())
        for name in names:
            if name not in self.targets:
                raise EdgepackError(
                    f"{self.path}: no target '{name}'; targets in this file: {', '.join(self.targets)}"
                )
        return [self.targets[n] for n in self.targets if n in names]

    def thresholds(self, fmt: str, variant: str, target: str | None = None) -> dict[str, float]:
        """The checks a variant of a format is held to in a target (a format shared by targets: each has its own
        table), or in the first target that builds the format; {} when the file sets none."""
        if target in self.targets and fmt in self.targets[target].formats:
            return self.targets[target].formats[fmt].thresholds.get(variant, {})
        for spec in self.targets.values():
            if fmt in spec.formats:
                return spec.formats[fmt].thresholds.get(variant, {})
        return {}


def _fail(path: Path, key: str, problem: str, valid) -> EdgepackError:
    return EdgepackError(f"{path}: {problem} '{key}'; valid: {', '.join(map(str, valid))}")


def _check_keys(path: Path, where: str, table: dict, valid: set[str] | tuple | dict) -> None:
    for key in table:
        if key not in valid:
            raise _fail(path, f"{where}{key}", "unknown key", sorted(valid) if isinstance(valid, set) else valid)


def _load_format(path: Path, target: str, fmt: str, table: dict) -> FormatSpec:
    where = f"{target}.{fmt}."
    if not isinstance(table, dict):
        raise EdgepackError(f"{path}: '{target}.{fmt}' must be a table")
    _check_keys(path, where, table, _FORMAT_KEYS)
    facts = FORMATS[fmt]
    runner = table.get("runner", facts["runner"])
    if runner != facts["runner"]:
        raise _fail(path, f"{where}runner = {runner}", "unknown runner", [facts["runner"]])
    variants = table.get("variants", [])
    if not isinstance(variants, list) or not variants:
        raise EdgepackError(f"{path}: '{where}variants' must be a non-empty list of {', '.join(facts['variants'])}")
    for v in variants:
        if v not in facts["variants"]:
            raise _fail(path, f"{where}variants: {v}", "unknown variant", facts["variants"])
    thresholds: dict[str, dict[str, float]] = {}
    for variant, checks in table.get("thresholds", {}).items():
        if variant not in facts["variants"]:
            raise _fail(path, f"{where}thresholds.{variant}", "unknown variant", facts["variants"])
        if not isinstance(checks, dict):
            raise EdgepackError(f"{path}: '{where}thresholds.{variant}' must be a table of checks")
        _check_keys(path, f"{where}thresholds.{variant}.", checks, THRESHOLD_KEYS)
        for key, value in checks.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise EdgepackError(f"{path}: '{where}thresholds.{variant}.{key}' must be a number, got {value!r}")
        thresholds[variant] = {k: float(v) for k, v in checks.items()}
    return FormatSpec(fmt, runner, tuple(variants), thresholds)


def _load_target(path: Path, name: str, table: dict) -> TargetSpec:
    if not isinstance(table, dict):
        raise EdgepackError(f"{path}: '{name}' must be a table")
    _check_keys(path, f"{name}.", table, _TARGET_KEYS)
    formats = {}
    for key, value in table.items():
        if key in FORMATS:
            if name not in format_targets(key):
                raise EdgepackError(
                    f"{path}: format '{key}' belongs to target '{' or '.join(format_targets(key))}', not '{name}'"
                )
            formats[key] = _load_format(path, name, key, value)
    if not formats:
        valid = [f for f in FORMATS if name in format_targets(f)]
        raise EdgepackError(f"{path}: target '{name}' names no format; valid: {', '.join(valid)}")
    context = table.get("context_length", 2048)
    if not isinstance(context, int) or isinstance(context, bool) or not 16 <= context <= 131072:
        raise EdgepackError(f"{path}: '{name}.context_length' must be an integer in 16..131072, got {context!r}")
    eps = table.get("execution_providers", [])
    if eps and name != "web":
        raise EdgepackError(f"{path}: 'execution_providers' applies to target 'web' only, not '{name}'")
    for ep in eps:
        if ep not in EXECUTION_PROVIDERS:
            raise _fail(path, f"{name}.execution_providers: {ep}", "unknown execution provider", EXECUTION_PROVIDERS)
    return TargetSpec(name, context, formats, tuple(eps))


def read_toml(path: Path, what: str, remedy: str) -> dict:
    """A TOML file's tables, or one error line: missing (what it is, the remedy) or not valid TOML."""
    if not path.is_file():
        raise EdgepackError(f"{what} not found: {path}; {remedy}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgepackError(f"{path}: not valid TOML ({exc}); fix the syntax") from None


def load_targets(path: str | Path | None = None) -> Targets:
    """Read and validate a targets file (the one edgepack ships when path is None)."""
    path = Path(path) if path else DEFAULT_TARGETS_FILE
    data = read_toml(path, "targets file", "pass --targets FILE")
    _check_keys(path, "", data, TARGETS)
    return Targets(path, {name: _load_target(path, name, table) for name, table in data.items()})
