"""Parity with the source: max |Δlogit|, KL, teacher-forced top-1, greedy match, perplexity ratio; and the checks."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from edgepack.artifacts import Artifact
from edgepack.runtime import open_runner
from edgepack.runtime.base import Runner

MAX_NEW_TOKENS = 64

# targets.toml threshold key -> (metric, comparison)
CHECKS = {
    "max_abs_logit": ("max_abs_logit", "<="),
    "max_kl": ("kl", "<="),
    "min_top1": ("top1", ">="),
    "min_greedy": ("greedy", ">="),
    "max_ppl_ratio": ("ppl_ratio", "<="),
    "min_engine_greedy": ("engine_greedy", ">="),  # a runner that also drives an app's engine (LiteRT-LM)
}


def prompt_set() -> dict:
    """The fixed prompts: four chat prompts and a plain-text passage of more than 256 tokens."""
    return json.loads(resources.files("edgepack").joinpath("data/parity.json").read_text(encoding="utf-8"))


@dataclass
class ReferenceTrace:
    """What the reference did on the prompt set: its greedy answers and the logits along them."""

    prompts: list[list[int]]
    answers: list[list[int]]  # greedy continuation, through the end-of-turn token when one came
    logits: list[np.ndarray]  # per prompt [len(answer), vocab]: the logits that predicted each answer token
    passage: list[int]
    passage_logits: np.ndarray  # [len(passage) - 1, vocab]


def teacher_forced(runner: Runner, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """Logits predicting each token of continuation, feeding the continuation itself (prefill, then decode)."""
    runner.reset()
    rows = [runner.prefill(prompt)]
    for token in continuation[:-1]:
        rows.append(runner.decode(token))
    return np.stack(rows).astype(np.float32)


def trace_reference(runner: Runner, max_new_tokens: int = MAX_NEW_TOKENS) -> ReferenceTrace:
    """Run the reference on the prompt set once; every artifact is then compared with this trace."""
    prompts = prompt_set()
    ids = [runner.encode(p) for p in prompts["chat"]]
    answers, logits = [], []
    for prompt in ids:
        answer = list(runner.generate_ids(prompt, max_new_tokens))
        answers.append(answer)
        logits.append(teacher_forced(runner, prompt, answer))
    passage = runner.encode(prompts["passage"], chat=False)
    passage_logits = teacher_forced(runner, passage[:1], passage[1:])
    return ReferenceTrace(ids, answers, logits, passage, passage_logits)


def reference_trace(source, max_new_tokens: int = MAX_NEW_TOKENS) -> ReferenceTrace:
    """trace_reference of a source, kept on disk under the cache (traces/): the same source (weights, config,
    tokenizer), prompts, reference code and libraries give the same trace, and every validate needs it (the default model's takes ~45 s to compute).
    A file that cannot be read is computed again; a new one is written atomically."""
    import hashlib
    import os
    from importlib import metadata
    from pathlib import Path

    from edgepack import __version__
    from edgepack.runtime.reference import source_artifact
    from edgepack.source import cache_root

    code = Path(__file__).resolve().parents[1]
    key = hashlib.sha256()
    for part in (source.sha256, json.dumps(prompt_set(), sort_keys=True), str(max_new_tokens), __version__,
                 *(metadata.version(p) for p in ("torch", "transformers", "tokenizers"))):
        key.update(part.encode() + b"\0")
    for file in sorted([*code.joinpath("model").glob("*.py"), code / "runtime" / "reference.py", Path(__file__)]):
        key.update(file.read_bytes())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):  # source.sha256 covers the weights only
        file = Path(source.path) / name
        key.update(file.read_bytes() if file.is_file() else b"-")
    path = cache_root() / "traces" / f"{source.slug}-{key.hexdigest()[:20]}.npz"
    try:
        with np.load(path) as data:
            n = int(data["count"])
            return ReferenceTrace([data[f"prompt_{i}"].tolist() for i in range(n)],
                                  [data[f"answer_{i}"].tolist() for i in range(n)],
                                  [data[f"logits_{i}"] for i in range(n)], data["passage"].tolist(),
                                  data["passage_logits"])
    except (OSError, KeyError, ValueError):
        pass
    ref = trace_reference(open_runner(source_artifact(source)), max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"count": np.array(len(ref.prompts)), "passage": np.array(ref.passage), "passage_logits": ref.passage_logits}
    for i, (prompt, answer, logits) in enumerate(zip(ref.prompts, ref.answers, ref.logits, strict=True)):
        arrays |= {f"prompt_{i}": np.array(prompt), f"answer_{i}": np.array(answer, dtype=np.int64), f"logits_{i}": logits}
    partial = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    return ref


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _nll(logits: np.ndarray, targets: list[int]) -> float:
    return float(-_log_softmax(logits)[np.arange(len(targets)), targets].mean())


def compare(ref: ReferenceTrace, logits: list[np.ndarray], passage_logits: np.ndarray) -> dict:
    """Metrics of an artifact's teacher-forced logits against the reference trace."""
    kls, top1, max_abs, matched, full = [], [], 0.0, [], 0
    for answer, want, got in zip(ref.answers, ref.logits, logits, strict=True):
        max_abs = max(max_abs, float(np.abs(want - got).max()))
        p_log, q_log = _log_softmax(want), _log_softmax(got)
        kls.append((np.exp(p_log) * (p_log - q_log)).sum(axis=-1))
        agree = got.argmax(axis=-1) == np.asarray(answer)
        top1.append(agree)
        # While the artifact's argmax equals the reference token, its greedy answer is the teacher-forced one,
        # so the greedy match is the agreeing prefix; it ends at the reference's end-of-turn token.
        n = len(answer) if agree.all() else int(np.argmin(agree))
        matched.append(n)
        full += n == len(answer)
    ppl_ratio = float(np.exp(_nll(passage_logits, ref.passage[1:]) - _nll(ref.passage_logits, ref.passage[1:])))
    return {
        "max_abs_logit": max_abs,
        "kl": float(np.concatenate(kls).mean()),
        "top1": float(np.concatenate(top1).mean()),
        "greedy": full / len(ref.answers),
        "greedy_tokens": [f"{m}/{len(a)}" for m, a in zip(matched, ref.answers, strict=True)],
        "ppl_ratio": ppl_ratio,
        "positions": int(sum(len(a) for a in ref.answers)),
    }


def measure(runner: Runner, ref: ReferenceTrace) -> dict:
    """Run an artifact over the reference's prompts and answers and compare."""
    logits = [teacher_forced(runner, p, a) for p, a in zip(ref.prompts, ref.answers, strict=True)]
    passage = teacher_forced(runner, ref.passage[:1], ref.passage[1:])
    return compare(ref, logits, passage)


def check(metrics: dict, thresholds: dict[str, float]) -> list[dict]:
    """One outcome per threshold: the metric, its value, the bound, and whether it passed."""
    outcomes = []
    for key, bound in thresholds.items():
        metric, op = CHECKS[key]
        value = metrics[metric]
        passed = value <= bound if op == "<=" else value >= bound
        outcomes.append({"check": key, "metric": metric, "value": value, "op": op, "bound": bound, "passed": passed})
    return outcomes


def validate_artifact(artifact: Artifact, thresholds: dict[str, float], ref: ReferenceTrace) -> dict:
    """Load an artifact's runner, measure it against the reference, and check it: used by the CLI and pytest."""
    runner = open_runner(artifact)
    metrics = measure(runner, ref)
    if hasattr(runner, "engine_metrics"):  # the same file in the engine an app runs it with, compared greedily
        metrics |= runner.engine_metrics(ref.prompts)
    result = {"key": artifact.key, "metrics": metrics, "checks": check(metrics, thresholds)}
    if compatibility := runner.compatibility():  # e.g. whether an older runtime can load the artifact
        result["compatibility"] = compatibility
    # freed before the baseline loads: two interpreters of the 1.24B int4 .tflite at once held 15.6 GB in validate
    del runner
    gc.collect()
    if artifact.baseline:  # the exporter's plain build of the same variant: how much its extra work bought
        plain = Artifact(artifact.target, artifact.format, artifact.variant, artifact.dir, artifact.baseline)
        result["baseline"] = measure(open_runner(plain), ref)
    return result


def _validate_from_cache(artifact: Artifact, thresholds: dict[str, float], source) -> dict:
    """In a spawned process: validate_artifact with the reference read from its cached trace (no copy sent over)."""
    return validate_artifact(artifact, thresholds, reference_trace(source))


def validate_in_child(artifact: Artifact, thresholds: dict[str, float], source) -> dict:
    """validate_artifact in a spawned process of its own, so that what one runtime keeps after its runner is freed
    (an interpreter's arenas, a loaded program) does not sit under the next artifact's peak: at 1.24B the whole
    android target validated in one process reached 20.6 GB; each artifact alone stays within its own runner.
    The reference trace must be cached already (reference_trace). A child that dies (out of memory) is one error."""
    from edgepack.errors import in_child

    return in_child(_validate_from_cache, artifact, thresholds, source, process=f"validating {artifact.key}: its "
                    "process", disk=artifact.dir, again=f"validate it alone with --variant {artifact.variant}")
