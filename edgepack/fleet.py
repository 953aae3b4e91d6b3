"""`edgepack fleet FLEET.toml`: many models × targets exported, validated and benched as Ray tasks, one report.

Ray does the distribution: scheduling by declared memory, retries of killed workers, a local cluster sized to
this machine by default or an existing one with --ray ADDRESS. edgepack adds only the job plan and the report:

- a job is one (model, target). Its export + validate task runs edgepack's own commands (cli.main, the code a
  user runs by hand: no second implementation) in a node-local folder, then uploads the target folder to --out
  with manifest.json last, so a half-uploaded target never looks complete. Its bench task downloads the target
  and benches it alone on its node: every node holds one unit of the custom resource "edgepack", export tasks
  take a sliver of it and bench tasks all of it.
- tasks declare the memory each target's export is measured to need (PEAK_GB) for the model's parameters, so Ray
  never places two jobs whose peaks together pass a node's memory.
- --out is a folder or any URL fsspec understands (s3://, gs://, file://): nodes share no disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import EdgepackError

# Peak export RSS per target ≈ a + b × parameters (GB, GB per billion), measured on this 2-core machine: the
# default model (135M) and a random model with Qwen2.5-0.5B's config (494M). cpu: 1.0 GB at 135M, 1.96 GB at 494M;
# android 14.4, ios 12.1 GB at 494M. web streams its weights (`edgepack bench-export`, process-tree RSS): 3.47 GB
# at 494M (3.60 in another run), 7.13 GB at Llama-3.2-1B's 1.24B, fit 1.03 + 4.93 × B; a is rounded up to 2.0 so
# the cap tests/test_scale.py holds the export to (4.5 GB at 494M) keeps a 25 % margin over the measured peaks.
# android and ios (2026-12-03): each format of a target is now exported in a process of its own
# (exporters.export_target), so a target's peak is its largest format's, not their sum. At 494M, the whole target:
# android 8.80 GB in one process, now 5.13 GB held (ExecuTorch; tflite 4.4, litertlm 4.7, the .ort's q4 5.1); ios
# 9.13 GB in one process, now 4.6 GB held. At 1.24B: tflite int8 + int4 7.1 GB held, pte-fp32 7.64, pte-8da4w
# 7.81, Core ML 5.09 GB. Single 0.5 s samples ran 1.5-3.7 GB above those beside them (ios 494M: 7.71 GB once),
# most likely a fork's copy-on-write pages counted in two processes. One line for both, above every held peak:
# 4.0 + 4.0 × B (5.98 GB at 494M, 8.96 at 1.24B, 19.2 at Phi-4-mini's 3.8B). The wave-1 lines (1.5 + 26.2 / 21.5
# × B) asked 34 / 28 GB for a 1.24B model, more than Ray on a 24 GB machine has, so such jobs were refused.
# validate runs in the same task: its measured peaks at 1.24B (web 7.70 GB, pte-fp32 8.16 GB) are within the lines.
# mac: mlx-lm's converter reads the safetensors lazily; its peak was 0.49 GB at 135M (fp32 file) and 1.08 GB at 494M
# (Qwen2.5-0.5B's config, bf16 file, fp16 variant; q8 0.90, q4 0.78).
PEAK_GB = {"cpu": (0.9, 2.2), "web": (2.0, 5.0), "android": (4.0, 4.0), "ios": (4.0, 4.0), "mac": (0.5, 2.2)}
RESOURCE = "edgepack"  # one unit per node; a bench task takes all of it, so it runs alone there
EXPORT_SHARE = 0.001
_FLEET_KEYS = {"targets", "targets_file", "model"}
_MODEL_KEYS = {"path", "targets", "variants"}


@dataclass(frozen=True)
class FleetModel:
    path: str
    targets: tuple[str, ...]
    variants: tuple[str, ...] = ()


@dataclass
class Fleet:
    path: Path
    models: list[FleetModel]
    targets_file: str | None = None
    jobs: list[tuple[FleetModel, str]] = field(default_factory=list)


def read_fleet(path: str | Path) -> Fleet:
    """FLEET.toml: `targets = [...]` (default for every model), optional `targets_file`, and `[[model]]` tables
    with `path` and optional `targets` / `variants`. Every mistake is one error naming the file and the key."""
    from edgepack.targets import TARGETS, read_toml

    path = Path(path)
    data = read_toml(path, "fleet file", "see the README's 'Many models' section for its form")
    if unknown := set(data) - _FLEET_KEYS:
        raise EdgepackError(f"{path}: unknown key '{sorted(unknown)[0]}'; valid: {', '.join(sorted(_FLEET_KEYS))}")
    default = data.get("targets", ["cpu", "web"])
    models = data.get("model") or []
    if not isinstance(models, list) or not models:
        raise EdgepackError(f"{path}: no [[model]] tables; add one per model with path = \"...\"")
    fleet = Fleet(path, [], data.get("targets_file"))
    if fleet.targets_file and not Path(fleet.targets_file).is_absolute():
        fleet.targets_file = str((path.parent / fleet.targets_file).resolve())
    for i, table in enumerate(models):
        where = f"{path}: model[{i}]"
        if not isinstance(table, dict) or "path" not in table:
            raise EdgepackError(f"{where}: needs path = \"MODEL_FOLDER_OR_GGUF\"")
        if unknown := set(table) - _MODEL_KEYS:
            raise EdgepackError(f"{where}: unknown key '{sorted(unknown)[0]}'; valid: {', '.join(sorted(_MODEL_KEYS))}")
        targets = table.get("targets", default)
        if "all" in targets:
            targets = list(TARGETS)
        for target in targets:
            if target not in TARGETS:
                raise EdgepackError(f"{where}: no target '{target}'; valid: {', '.join(TARGETS)}")
        model_path = Path(table["path"]).expanduser()
        model_path = model_path if model_path.is_absolute() else (path.parent / model_path).resolve()
        if not model_path.exists():
            raise EdgepackError(f"{where}: {model_path} does not exist; give a Hugging Face folder or a .gguf file")
        model = FleetModel(str(model_path), tuple(targets), tuple(table.get("variants", ())))
        fleet.models.append(model)
        fleet.jobs += [(model, t) for t in model.targets]
    return fleet


def job_id(fleet: Fleet, model: FleetModel, target: str) -> str:
    """<model folder or file name>-<target>; models that share a name get #1, #2… in fleet order."""
    names = [Path(m.path).name for m in fleet.models]
    name = Path(model.path).name
    if names.count(name) > 1:
        name += f"#{[m.path for m in fleet.models if Path(m.path).name == name].index(model.path) + 1}"
    return f"{name}-{target}"


def parameter_count(model_path: str) -> int:
    """Parameters of a model, from the safetensors headers or the GGUF tensor table alone (no weights read)."""
    path = Path(model_path)
    if path.suffix == ".gguf":
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def peak_bytes(target: str, parameters: int) -> int:
    a, b = PEAK_GB[target]
    return int((a + b * parameters / 1e9) * 1e9)


# --- storage: a folder or a URL -------------------------------------------------------------------------------

def _fs(out: str):
    import fsspec

    return fsspec.core.url_to_fs(out)


def upload_target(local_target: Path, out: str, slug: str, target: str) -> None:
    """local dist/<slug>/<target>/ → <out>/<slug>/<target>/, whatever was there first removed, manifest.json last."""
    fs, root = _fs(out)
    remote = f"{root.rstrip('/')}/{slug}/{target}"
    if fs.exists(remote):
        fs.rm(remote, recursive=True)
    files = sorted(p for p in local_target.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == "manifest.json"):
        dest = f"{remote}/{path.relative_to(local_target).as_posix()}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), dest)


def download_target(out: str, slug: str, target: str, local_model: Path) -> None:
    fs, root = _fs(out)
    remote = f"{root.rstrip('/')}/{slug}/{target}"
    for path in fs.find(remote):
        dest = local_model / target / path[len(remote) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(dest))


def write_out(out: str, relative: str, data: bytes) -> None:
    fs, root = _fs(out)
    dest = f"{root.rstrip('/')}/{relative}"
    fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(dest, "wb") as f:
        f.write(data)


# --- the two tasks --------------------------------------------------------------------------------------------

def _job_dir(name: str) -> Path:
    """The node-local folder of one job; a retry first sweeps what a killed attempt left there."""
    folder = Path(tempfile.gettempdir()) / "edgepack-fleet" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _die_with_parent() -> None:
    """In the child: be killed when the Ray worker that started it dies (Linux), so a killed task leaves no
    orphan export running."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _edgepack(*args) -> tuple[int, str]:
    """One edgepack command, exactly as a user runs it, in a child process (its memory is returned when it ends).
    Returns the exit status and the last line of its stderr."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgepack", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=_die_with_parent)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, (lines[-1] if lines else "no output")


def _rows(model_folder: Path, target: str) -> dict:
    from edgepack.runtime.report import load_report

    report = load_report(model_folder)
    rows = {k: v for k, v in report["rows"].items() if v["target"] in (target, "anchor")}
    return {"rows": rows, **{k: report[k] for k in ("bandwidth_gbs", "bandwidth_method") if k in report}}


def _arguments(job: dict, folder: Path) -> tuple[list, list]:
    """The job's --model / --out / --targets arguments, and its --variant ones (none: the matrix's variants)."""
    common = ["--model", job["model"], "--out", folder / "dist"]
    common += ["--targets", job["targets_file"]] if job["targets_file"] else []
    return common, (["--variant", *job["variants"]] if job["variants"] else [])


def export_and_validate(job: dict, progress) -> dict:
    """One job's first task: export, validate, upload. Returns its report rows and whether every check passed."""
    progress.event.remote(job["id"], "export", os.getpid())
    folder = _job_dir(job["id"])
    common, variants = _arguments(job, folder)
    code, last = _edgepack("export", "--target", job["target"], *variants, *common)
    if code != 0:
        raise EdgepackError(f"{job['id']}: edgepack export failed: {last}")
    (slug,) = [p.name for p in (folder / "dist").iterdir() if p.is_dir()]
    progress.event.remote(job["id"], "validate", os.getpid())
    code, last = _edgepack("validate", "--target", job["target"], *variants, *common)
    if code not in (0, 1):  # 1: a threshold missed, which the report shows; anything else is an error
        raise EdgepackError(f"{job['id']}: edgepack validate failed: {last}")
    passed = code == 0
    model_folder = folder / "dist" / slug
    upload_target(model_folder / job["target"], job["out"], slug, job["target"])
    result = {"slug": slug, "passed": passed, **_rows(model_folder, job["target"])}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def bench(job: dict, slug: str, progress) -> dict:
    """One job's second task, alone on its node: download the target, bench it, return its rows."""
    progress.event.remote(job["id"], "bench", os.getpid())
    folder = _job_dir(job["id"] + "-bench")
    download_target(job["out"], slug, job["target"], folder / "dist" / slug)
    common, variants = _arguments(job, folder)
    code, last = _edgepack("bench", "--target", job["target"], *variants, *common)
    if code != 0:
        raise EdgepackError(f"{job['id']}: edgepack bench failed: {last}")
    result = _rows(folder / "dist" / slug, job["target"])
    shutil.rmtree(folder, ignore_errors=True)
    return result


# --- the driver -----------------------------------------------------------------------------------------------

def run_fleet(fleet: Fleet, out: str, address: str | None = None, retries: int = 2, bench_speed: bool = True,
              on_event=None, log=print) -> dict:
    """Run every job of the fleet on Ray; write fleet.json, fleet.html and each model's report under out."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
        if not ray.cluster_resources().get(RESOURCE):
            raise EdgepackError(f"no node of the Ray cluster at {address} declares the '{RESOURCE}' resource; start "
                                f"each node with ray start --resources='{{\"{RESOURCE}\": 1}}'")
    else:  # the embedded default: a local Ray sized to this machine
        ray.init(num_cpus=os.cpu_count(), resources={RESOURCE: 1}, object_store_memory=256 * 2**20,
                 include_dashboard=False, log_to_driver=False)
    try:
        return _drive(fleet, out, retries, bench_speed, on_event or (lambda *a: None), log, ray)
    finally:
        ray.shutdown()


def _drive(fleet, out, retries, bench_speed, on_event, log, ray) -> dict:
    from rich.console import Console
    from rich.progress import Progress

    @ray.remote(num_cpus=0)
    class ProgressLog:  # tasks report when each stage starts (and from which process): one line per event
        def __init__(self):
            self.events = []

        def event(self, job_id, stage, pid):
            self.events.append((job_id, stage, pid))

        def drain(self):
            events, self.events = self.events, []
            return events

    progress = ProgressLog.remote()
    export_task = ray.remote(max_retries=retries, max_calls=1)(export_and_validate)
    bench_task = ray.remote(max_retries=retries, max_calls=1, resources={RESOURCE: 1})(bench)
    params = {m.path: parameter_count(m.path) for m in fleet.models}
    # Ray would wait forever for a node big enough; a job no node can hold is reported failed instead
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    jobs, failed = {}, []
    for model, target in fleet.jobs:
        job = {"id": job_id(fleet, model, target), "model": model.path, "target": target, "out": out,
               "variants": list(model.variants), "targets_file": fleet.targets_file}
        need = peak_bytes(target, params[model.path])
        if need > largest:
            failed.append({"job": job["id"], "stage": "export", "error": f"needs about {need / 1e9:.0f} GB to export "
                           f"(edgepack's measured estimate), more than any node's {largest / 1e9:.0f} GB"})
            log(f"{job['id']}: not started — {failed[-1]['error']}")
            continue
        ref = export_task.options(memory=need, resources={RESOURCE: EXPORT_SHARE}).remote(job, progress)
        jobs[ref] = (job, "export")
    cells, started = {}, time.monotonic()
    total = len(jobs) * (2 if bench_speed else 1)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        overall = bar.add_task("fleet", total=total)
        pending = list(jobs)
        while pending:
            done, pending = ray.wait(pending, timeout=0.5)
            for name, stage, pid in ray.get(progress.drain.remote()):
                bar.console.print(f"{name}: {stage} started (pid {pid})")
                on_event(name, stage, pid)
            for ref in done:
                job, stage = jobs.pop(ref)
                bar.advance(overall, 1)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # after Ray's retries: named in the report, the fleet goes on
                    why = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
                    failed.append({"job": job["id"], "stage": stage, "error": why})
                    if stage == "export" and bench_speed:
                        bar.advance(overall, 1)  # its bench will not run
                    bar.console.print(f"{job['id']}: {stage} FAILED — {why}")
                    continue
                cell = cells.setdefault(job["id"], {"model": job["model"], "target": job["target"],
                                                    "parameters": params[job["model"]], "rows": {}})
                _merge(cell, result)
                if stage == "export":
                    cell["slug"], cell["passed"] = result["slug"], result["passed"]
                    bar.console.print(f"{job['id']}: exported and validated — "
                                      f"{'pass' if result['passed'] else 'FAIL (thresholds)'}")
                    if bench_speed:
                        ref = bench_task.remote(job, result["slug"], progress)
                        jobs[ref] = (job, "bench")
                        pending.append(ref)
                else:
                    bar.console.print(f"{job['id']}: benched")
    summary = _summaries(cells, failed, fleet, time.monotonic() - started)
    _write_model_reports(cells, out)
    write_out(out, "fleet.json", json.dumps(summary, indent=2).encode())
    write_out(out, "fleet.html", render_fleet_html(summary).encode())
    log(f"fleet: {len(summary['cells'])} cells, {sum(c['passed'] for c in summary['cells'])} pass, "
        f"{len(failed)} failed jobs → {out}/fleet.html")
    return summary


def _merge(cell: dict, result: dict) -> None:
    for key, row in result["rows"].items():
        cell["rows"].setdefault(key, {}).update(row)
    for key in ("bandwidth_gbs", "bandwidth_method"):
        if key in result:
            cell[key] = result[key]


def _summaries(cells: dict, failed: list, fleet: Fleet, seconds: float) -> dict:
    """fleet.json: one entry per (model, target, variant) with size, KL, top-1, tok/s and pass/fail."""
    rows = []
    for _, cell in sorted(cells.items()):
        for key, row in sorted(cell["rows"].items()):
            if row["target"] != cell["target"]:
                continue  # the llama.cpp anchor rides along in each bench
            parity, bench = row.get("parity", {}), row.get("bench", {})
            checks = parity.get("checks")
            rows.append({
                "model": cell.get("slug", Path(cell["model"]).name), "target": cell["target"],
                "format": row["format"], "variant": row["variant"], "parameters": cell["parameters"],
                "bytes": row["bytes"], "kl": parity.get("metrics", {}).get("kl"),
                "top1": parity.get("metrics", {}).get("top1"), "decode_tok_s": bench.get("decode_tok_s"),
                "roofline_ratio": bench.get("roofline_ratio"),
                "passed": checks is not None and all(c["passed"] for c in checks),
                "report": f"{cell.get('slug', '?')}/report.html",
            })
    return {"fleet": str(fleet.path), "seconds": round(seconds, 1), "cells": rows, "failed": failed,
            "jobs": [job_id(fleet, m, t) for m, t in fleet.jobs]}


def _write_model_reports(cells: dict, out: str) -> None:
    """Each model's own report.json / .md / .html from its jobs' rows, as `edgepack report` renders it."""
    from edgepack.runtime.report import write_reports

    by_model: dict[str, dict] = {}
    for cell in cells.values():
        if "slug" not in cell:
            continue
        report = by_model.setdefault(cell["slug"], {"model": cell["slug"], "rows": {}})
        for key, row in cell["rows"].items():
            report["rows"].setdefault(key, {}).update(row)
        for key in ("bandwidth_gbs", "bandwidth_method"):
            if key in cell:
                report[key] = cell[key]
    for slug, report in by_model.items():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2))
            write_reports(Path(tmp))
            for name in ("report.json", "report.md", "report.html"):
                write_out(out, f"{slug}/{name}", (Path(tmp) / name).read_bytes())


def render_fleet_html(summary: dict) -> str:
    import html

    from edgepack.runtime.report import svg_figure

    cells = summary["cells"]
    parts = [f"<h1>edgepack fleet: {html.escape(summary['fleet'])}</h1>",
             f"<p>{len(cells)} cells in {summary['seconds']:.0f} s; "
             f"{sum(c['passed'] for c in cells)} pass.</p>"]
    if summary["failed"]:
        parts.append("<h2>Failed jobs (after retries)</h2><ul>" + "".join(
            f"<li>{html.escape(f['job'])} ({f['stage']}): {html.escape(f['error'])}</li>" for f in summary["failed"])
            + "</ul>")
    models = sorted({c["model"] for c in cells})
    for target in sorted({c["target"] for c in cells}):
        variants = sorted({c["variant"] for c in cells if c["target"] == target})
        head = "".join(f"<th>{html.escape(v)}</th>" for v in variants)
        body = ""
        for model in models:
            tds = ""
            for variant in variants:
                c = next((c for c in cells if (c["model"], c["target"], c["variant"]) == (model, target, variant)),
                         None)
                tds += f"<td>{_cell_text(c)}</td>" if c else "<td>—</td>"
            body += f"<tr><th><a href='{html.escape(model)}/report.html'>{html.escape(model)}</a></th>{tds}</tr>"
        parts.append(f"<h2>{html.escape(target)}</h2><table><tr><th>model</th>{head}</tr>{body}</table>")
    parts += [f"<figure>{svg}</figure>" for svg in _fleet_plots(cells, svg_figure)]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>edgepack fleet</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.fail{color:#c00}"
            "figure{display:inline-block;margin:1em}</style></head><body>" + "".join(parts) + "</body></html>\n")


def _cell_text(c: dict) -> str:
    figures = [f"{c['bytes'] / 1e6:.1f} MB"]
    if c["kl"] is not None:
        figures.append(f"KL {c['kl']:.3g} · top-1 {c['top1']:.3f}")
    if c["decode_tok_s"] is not None:
        figures.append(f"{c['decode_tok_s']:.1f} tok/s")
    verdict = "<b>pass</b>" if c["passed"] else "<b class='fail'>FAIL</b>"
    return "<br>".join(figures) + "<br>" + verdict


def _fleet_plots(cells: list[dict], svg_figure) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plots = []
    for target in sorted({c["target"] for c in cells}):
        mine = [c for c in cells if c["target"] == target and c["kl"] is not None]
        if mine:
            fig, ax = plt.subplots(figsize=(6, 3.8))
            for model in sorted({c["model"] for c in mine}):
                ours = [c for c in mine if c["model"] == model]
                ax.scatter([c["bytes"] / 1e6 for c in ours], [max(c["kl"], 1e-9) for c in ours], label=model)
                for c in ours:
                    ax.annotate(c["variant"], (c["bytes"] / 1e6, max(c["kl"], 1e-9)), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set(xlabel="size (MB)", ylabel="mean KL vs source (log)", yscale="log", xscale="log",
                   title=f"{target}: size vs fidelity")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            plots.append(svg_figure(fig))
            plt.close(fig)
    speed = [c for c in cells if c["decode_tok_s"] is not None]
    if speed:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for series in sorted({(c["target"], c["variant"]) for c in speed}):
            ours = sorted((c for c in speed if (c["target"], c["variant"]) == series), key=lambda c: c["parameters"])
            ax.plot([c["parameters"] / 1e6 for c in ours], [c["decode_tok_s"] for c in ours], marker="o",
                    label=" ".join(series))
        ax.set(xlabel="parameters (M, log)", ylabel="decode tokens/s", xscale="log", title="Speed vs model size")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        plots.append(svg_figure(fig))
        plt.close(fig)
    return plots
