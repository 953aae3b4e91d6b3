"""`edgepack bench-export`: export seconds and peak RSS per target for random-weight models with real configs.

No model hub is needed: SHAPES holds the published configs (Hugging Face names), and build_random_model writes a
model of that exact shape (bf16 safetensors, normal(0, 0.02) weights, norm weights 1, the default model's
tokenizer). Random weights are right for memory, time and fp32/fp16 parity; they say nothing about int4 fidelity.

measure() runs one `edgepack` command in a child process and samples the resident memory of its whole process
tree (the child and everything it starts: llama.cpp's tools, the MLX worker) every 0.1 s; with cap_bytes it kills
the tree the moment the sum passes the cap, so a test can fail on memory without the machine running out of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgepack.errors import EdgepackError

_COMMON = {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
           "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
SHAPES = {  # config.json facts of the published models (NOTES.md); vocab sizes as published (padded where they are)
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0,
                     "rms_norm_eps": 1e-5, "max_position_embeddings": 8192},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen3-1.7b": {"model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                   "rope_theta": 1e6},
    "qwen2.5-3b": {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6},
    "phi-4-mini": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064, "rope_theta": 10000.0,
                   "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
                   "original_max_position_embeddings": 4096,
                   "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}},
}


def build_random_model(folder: Path, shape: str, tokenizer_from: Path | None = None) -> Path:
    """A random-weight Hugging Face folder with SHAPES[shape]'s config. Built layer by layer on the meta device and
    saved in bf16, so building it needs about 2 bytes per parameter. Idempotent: an existing folder is kept."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if shape not in SHAPES:
        raise EdgepackError(f"bench-export: unknown model shape '{shape}'; choose from {', '.join(SHAPES)}")
    folder = Path(folder)
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.for_model(**(_COMMON | SHAPES[shape]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # without it a tied model saves its own lm_head
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(0.0 if config.model_type.startswith("gemma") else 1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="50GB")
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    tokenizer_from = tokenizer_from or _default_tokenizer_folder()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, tmp / name)
    del model
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _default_tokenizer_folder() -> Path:
    from edgepack.source import resolve

    return resolve(None).path


def _tree_memory(proc, pss: bool, each: dict | None = None) -> tuple[int, int]:
    """(RSS, PSS) summed over proc and its descendants; PSS is 0 unless asked for; each (when given) gets every
    process's RSS by pid. The RSS sum counts a page that two processes share (a forked child's copy-on-write pages,
    the libraries every spawned child maps) once per process: an upper bound, which is why the cap reads it. PSS
    splits each shared page among its sharers, so its sum is what the tree holds; reading it walks each process's
    page tables (/proc/PID/smaps_rollup)."""
    import psutil

    rss = shared = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                one = p.memory_info().rss
                rss += one
                if each is not None:
                    each[p.pid] = one
                if pss:
                    shared += p.memory_full_info().pss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return rss, shared


def _describe(rss_by_pid: dict[int, int]) -> list[str]:
    """'RSS GB  command' for each process of a peak sample, largest first (what held the memory at that moment)."""
    import psutil

    lines = []
    for pid, rss in sorted(rss_by_pid.items(), key=lambda item: -item[1]):
        try:
            command = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            command = "(gone)"
        lines.append(f"{rss / 1e9:.2f} GB  pid {pid}  {command[:160]}")
    return lines


def measure(args: list[str], cap_bytes: int | None = None, log_path: Path | None = None,
            stdout_path: Path | None = None) -> dict:
    """Run `edgepack ARGS` in a child process; returns its exit code, seconds, peak tree RSS and peak tree PSS
    (bytes; _tree_memory), whether the cap (on the RSS) killed it, and the last line it wrote to stderr. Its
    output goes to log_path (stdout to stdout_path when given)."""
    import psutil

    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    stdout = open(stdout_path, "w") if stdout_path else log
    start = time.perf_counter()
    # stderr to the log: merged into a separate stdout file (STDOUT) it would land in the middle of a --json answer
    stderr = log if log_path and stdout_path else subprocess.STDOUT if log_path else subprocess.PIPE
    child = subprocess.Popen([sys.executable, "-m", "edgepack", *map(str, args)], stdout=stdout, stderr=stderr,
                             text=True)
    proc, peak, peak_pss, capped, tick = psutil.Process(child.pid), 0, 0, False, 0
    at_peak: dict = {}
    while child.poll() is None:
        each: dict[int, int] = {}
        rss, pss = _tree_memory(proc, pss=tick % 5 == 0, each=each)  # PSS every 0.5 s: its page walk costs CPU
        if rss > at_peak.get("rss", 0) + 50e6:  # a new peak (by 50 MB: not each step of a load): which processes
            # held it, and what the tree's PSS was at that moment (read now)
            at_peak = {"rss": rss, "seconds": round(time.perf_counter() - start, 1), "processes": _describe(each),
                       "pss": pss or _tree_memory(proc, pss=True)[1]}
        peak, peak_pss, tick = max(peak, rss), max(peak_pss, pss, at_peak.get("pss", 0)), tick + 1
        if cap_bytes and peak > cap_bytes:
            capped = True
            for p in [*proc.children(recursive=True), proc]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            child.wait()
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if stdout_path:
        stdout.close()
    if log_path:
        log.close()
        lines = [line for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    else:
        lines = [line for line in child.stderr.read().splitlines() if line.strip()]
    return {"code": child.returncode, "seconds": round(seconds, 1), "peak_rss": peak, "peak_pss": peak_pss,
            "at_peak_rss": at_peak, "capped": capped, "last_line": lines[-1] if lines else ""}


def bench_export(shapes: list[str], targets: list[str], work: Path, log=print, validate: bool = False) -> list[dict]:
    """Build each shape's random model under work/models, export each target into work/dist (one fresh export per
    target, --force), and measure it. With validate, `edgepack validate` on what was exported is measured too
    (row["validate"]: seconds, peaks, and each artifact's checks). Returns one row per (shape, target)."""
    from edgepack.fleet import parameter_count

    rows = []
    for shape in shapes:
        folder = build_random_model(work / "models" / shape, shape)
        params = parameter_count(str(folder))
        for target in targets:
            out = work / "dist" / shape
            shutil.rmtree(out, ignore_errors=True)
            result = measure(["export", "--model", folder, "--target", target, "--out", out, "--force"],
                             log_path=work / f"{shape}-{target}.log")
            row = {"shape": shape, "parameters": params, "target": target, **result}
            rows.append(row)
            log(f"{shape:>14} {params / 1e9:5.2f}B {target:>8}: {'ok' if result['code'] == 0 else 'FAILED'} "
                f"{result['seconds']:7.1f} s  peak {result['peak_rss'] / 1e9:5.2f} GB (PSS {result['peak_pss'] / 1e9:5.2f})"
                + ("" if result["code"] == 0 else f"  ({result['last_line']})"))
            if peak := result["at_peak_rss"]:
                log(f"{'':>22} at the peak ({peak['seconds']:.0f} s in; the tree's PSS then {peak['pss'] / 1e9:.2f} GB): "
                    + "; ".join(peak["processes"][:3]))
            if validate and result["code"] == 0:
                row["validate"] = _measure_validate(folder, target, out, work / f"{shape}-{target}-validate")
                v = row["validate"]
                log(f"{'':>14} {'':>6} {target:>8}: validate {v['seconds']:7.1f} s  peak {v['peak_rss'] / 1e9:5.2f} GB"
                    f" (PSS {v['peak_pss'] / 1e9:5.2f}); " + (", ".join(
                        f"{key} {'pass' if ok else 'miss'}" for key, ok in v["passed"].items()) or v["last_line"]))
            shutil.rmtree(out, ignore_errors=True)
    return rows


def _measure_validate(folder: Path, target: str, out: Path, stem: Path) -> dict:
    """measure() of `edgepack validate --json` on out; its JSON (stdout) kept at STEM.json, its log at STEM.log.
    passed: each artifact's verdict. Random weights make the quantized variants' own bars meaningless (near-ties),
    so a reader compares those with their plain baselines; fp32 / fp16 are held to theirs."""
    log, found = Path(f"{stem}.log"), Path(f"{stem}.json")  # not with_suffix: "llama-3.2-1b-…" has a dot
    result = measure(["validate", "--model", folder, "--target", target, "--out", out, "--json"],
                     log_path=log, stdout_path=found)
    text = found.read_text() if found.is_file() else ""
    try:  # the JSON list: validate's stdout (its progress and "threshold missed" lines go to the log)
        checked = json.JSONDecoder().raw_decode(text[text.index("["):])[0]
    except ValueError:
        checked = []
    result["passed"] = {r["key"]: all(c["passed"] for c in r["checks"]) for r in checked}
    result["metrics"] = {r["key"]: {k: r["metrics"][k] for k in ("kl", "top1", "max_abs_logit") if k in r["metrics"]}
                         for r in checked}
    return result


def write_rows(rows: list[dict], path: Path) -> dict:
    """Merge rows into path's bench-export.json (a (shape, target) measured again replaces its old row, so one
    target can be re-run without losing the others) and return the merged document."""
    from datetime import datetime, timezone

    import platform

    import psutil

    old = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    fresh = {(r["shape"], r["target"]) for r in rows}
    doc = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": {
        "cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform()}, "rows": [r for r in old if (r["shape"], r["target"]) not in fresh] + rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def fit(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per target, peak ≈ a + b × parameters (GB, GB per billion) through the successful rows: a least-squares line
    through two or more sizes, or, with one size, b from that size alone (a = 0)."""
    import numpy as np

    lines = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        points = [(r["parameters"] / 1e9, r["peak_rss"] / 1e9) for r in rows if r["target"] == target and r["code"] == 0]
        if len({x for x, _ in points}) >= 2:
            b, a = np.polyfit([x for x, _ in points], [y for _, y in points], 1)
            lines[target] = (float(a), float(b))
        elif points:
            lines[target] = (0.0, points[0][1] / points[0][0])
    return lines
