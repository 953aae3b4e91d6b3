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
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **extra})
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
        f"{bench['decode_tok_s']:.1f}" if "decode_tok_s" in bench else "—",
        f"{100 * bench['roofline_ratio']:.0f} %" if "roofline_ratio" in bench else "—",
        verdict,
    ]


def render_markdown(report: dict) -> str:
    lines = [f"# edgepack report: {report.get('model', '?')}", ""]
    if "bandwidth_gbs" in report:
        lines += [f"Memory read bandwidth {report['bandwidth_gbs']:.1f} GB/s; roofline tok/s = bandwidth ÷ weight "
                  "bytes read per token. Greedy: tokens equal to the reference per chat prompt.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report["rows"].values()]
    return "\n".join(lines) + "\n"


def _svg(fig) -> str:
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
        plots.append(_svg(fig))
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
        plots.append(_svg(fig))
        plt.close(fig)
    return plots


def render_html(report: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>"
                   for r in report["rows"].values())
    figures = "".join(f"<figure>{svg}</figure>" for svg in _plots(report))
    title = html.escape(f"edgepack report: {report.get('model', '?')}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}figure{display:inline-block;margin:1em}"
            f"</style></head><body><h1>{title}</h1><table><tr>{head}</tr>{body}</table>{figures}</body></html>\n")


def write_reports(model_folder: Path) -> str:
    """Render report.md and report.html from report.json; return the markdown."""
    report = load_report(model_folder)
    if not report["rows"]:
        raise EdgepackError(f"{model_folder}: no figures yet; run edgepack validate and edgepack bench first")
    markdown = render_markdown(report)
    (Path(model_folder) / "report.md").write_text(markdown, encoding="utf-8")
    (Path(model_folder) / "report.html").write_text(render_html(report), encoding="utf-8")
    return markdown
