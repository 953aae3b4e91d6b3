"""Parity metrics on known inputs, and the reference runner measured against itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepack.runtime import open_runner
from edgepack.runtime.parity import ReferenceTrace, check, compare, measure, trace_reference
from edgepack.runtime.reference import source_artifact
from edgepack.source import resolve


def _trace(rng, prompts=4, answer_len=64, vocab=50, passage_len=300) -> ReferenceTrace:
    logits = [rng.normal(size=(answer_len, vocab)).astype(np.float32) for _ in range(prompts)]
    answers = [list(map(int, row.argmax(axis=-1))) for row in logits]  # greedy: each token is the argmax
    passage = list(map(int, rng.integers(0, vocab, passage_len)))
    return ReferenceTrace([[1, 2, 3]] * prompts, answers, logits, passage,
                          rng.normal(size=(passage_len - 1, vocab)).astype(np.float32))


def test_identical_logits_give_kl_zero_top1_one_and_a_full_greedy_match():
    ref = _trace(np.random.default_rng(0))
    metrics = compare(ref, [row.copy() for row in ref.logits], ref.passage_logits.copy())
    assert metrics["kl"] == 0.0
    assert metrics["top1"] == 1.0
    assert metrics["max_abs_logit"] == 0.0
    assert metrics["greedy"] == 1.0
    assert metrics["greedy_tokens"] == ["64/64"] * 4
    assert metrics["ppl_ratio"] == pytest.approx(1.0, abs=1e-12)


def test_greedy_match_stops_at_the_first_divergence():
    ref = _trace(np.random.default_rng(1))
    logits = [row.copy() for row in ref.logits]
    logits[2][10] = -logits[2][10]  # position 10 of prompt 3 now prefers another token
    metrics = compare(ref, logits, ref.passage_logits)
    assert metrics["greedy_tokens"] == ["64/64", "64/64", "10/64", "64/64"]
    assert metrics["greedy"] == 0.75
    assert metrics["top1"] == pytest.approx(255 / 256)


def test_kl_and_perplexity_ratio_have_their_textbook_values():
    # two-token vocabulary: reference p = (0.5, 0.5), artifact q = (0.8, 0.2)
    ref = ReferenceTrace([[0]], [[0]], [np.zeros((1, 2), np.float32)], [0, 0], np.zeros((1, 2), np.float32))
    q = np.log(np.array([[0.8, 0.2]], np.float32))
    metrics = compare(ref, [q], q)
    assert metrics["kl"] == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2), rel=1e-6)
    assert metrics["ppl_ratio"] == pytest.approx((1 / 0.8) / (1 / 0.5), rel=1e-6)


def test_checks_compare_each_metric_with_its_bound():
    metrics = {"kl": 0.05, "top1": 0.9, "max_abs_logit": 2e-3, "greedy": 1.0, "ppl_ratio": 1.01}
    outcomes = {c["check"]: c["passed"] for c in check(metrics, {
        "max_kl": 0.06, "min_top1": 0.95, "max_abs_logit": 1e-3, "min_greedy": 1.0, "max_ppl_ratio": 1.02})}
    assert outcomes == {"max_kl": True, "min_top1": False, "max_abs_logit": False, "min_greedy": True,
                        "max_ppl_ratio": True}


def test_the_reference_runner_measured_against_itself_is_exact(tiny_models):
    runner = open_runner(source_artifact(resolve(str(tiny_models["qwen3"]))))
    ref = trace_reference(runner, max_new_tokens=8)
    assert len(ref.passage) > 256
    assert all(1 <= len(a) <= 8 for a in ref.answers)
    metrics = measure(runner, ref)
    assert metrics["kl"] == pytest.approx(0, abs=1e-9)
    assert metrics["top1"] == 1.0 and metrics["greedy"] == 1.0


def test_generation_stops_at_end_of_turn_and_streams_text(default_source):
    runner = open_runner(source_artifact(default_source))
    text = "".join(runner.generate("What is the capital of France?", max_new_tokens=32))
    assert "Paris" in text
    ids = list(runner.generate_ids(runner.encode("What is the capital of France?"), 32))
    assert ids[-1] == 2 and len(ids) < 32  # <|im_end|>


def test_the_reference_trace_is_cached_and_a_damaged_cache_is_recomputed(tiny_models, tmp_path, monkeypatch):
    from edgepack.runtime.parity import reference_trace

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    source = resolve(str(tiny_models["qwen3"]))
    first = reference_trace(source, max_new_tokens=8)
    [stored] = (tmp_path / "traces").glob("*.npz")
    again = reference_trace(source, max_new_tokens=8)
    assert again.prompts == first.prompts and again.answers == first.answers and again.passage == first.passage
    assert all(np.array_equal(a, b) for a, b in zip(again.logits, first.logits))
    assert np.array_equal(again.passage_logits, first.passage_logits)
    stored.write_bytes(b"not an npz")  # a damaged file is recomputed, not trusted
    assert reference_trace(source, max_new_tokens=8).answers == first.answers
    assert sorted((tmp_path / "traces").glob("*.npz")) == [stored] and stored.stat().st_size > 100
