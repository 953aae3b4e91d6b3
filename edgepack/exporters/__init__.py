"""Exporters: one module per format, one registry, and the atomic build of a target folder."""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timezone
from pathlib import Path

from edgepack import __version__
from edgepack.artifacts import (BASELINE_DIR, MANIFEST, atomic_dir, file_entry, library_versions, link_or_copy,
                                read_manifest, write_json)
from edgepack.errors import EdgepackError
from edgepack.exporters.base import EXPORTERS, Exporter, register, reusable_entries
from edgepack.source import Source
from edgepack.targets import TargetSpec

__all__ = ["EXPORTERS", "Exporter", "register", "export_target"]

# Importing a format module registers its exporter; a format listed in targets.py with no module here is
# reported as "not available yet" by doctor and skipped by `export --target all`.
for _module in ("gguf", "onnx_web", "onnx_mobile", "tflite", "litertlm", "coreml", "mlx", "executorch"):
    __import__(f"edgepack.exporters.{_module}")


@contextlib.contextmanager
def _finishing(exporters):
    try:
        yield
    finally:
        for exporter in exporters:
            exporter.finish()


def export_target(
    source: Source, target: TargetSpec, variants: dict[str, list[str]], model_folder: Path, force: bool, log=print
) -> Path:
    """Build dist/<slug>/<target>/ with the requested variants (keeping other up-to-date ones) atomically."""
    final = Path(model_folder) / target.name
    old = read_manifest(final)
    plan = []  # (fmt, variant, reusable manifest entry or None)
    for fmt, names in variants.items():
        reuse = reusable_entries(old, source, target, fmt)
        plan += [(fmt, v, None if force else reuse.get(v)) for v in names]
    asked = {(fmt, v) for fmt, v, _ in plan}
    for entry in old["artifacts"] if old else []:  # exported before, not asked for now: keep if still current
        fmt = entry["format"]
        if (fmt, entry["variant"]) not in asked and fmt in EXPORTERS and entry["variant"] in reusable_entries(old, source, target, fmt):
            plan.append((fmt, entry["variant"], entry))
    if old and all(entry for _, _, entry in plan) and len(plan) == len(old["artifacts"]):
        log(f"{target.name}: up to date ({', '.join(v for _, v, _ in plan)}); --force rebuilds")
        return final
    artifacts = []
    exporters = {fmt: EXPORTERS[fmt]() for fmt, _, _ in plan}
    with atomic_dir(final) as tmp, _finishing(exporters.values()):
        for exporter in exporters.values():
            exporter.write_shared(source, tmp, target)
        for fmt, variant, entry in plan:
            if entry:
                for f in entry["files"] + entry.get("baseline_files", []) + old["shared_files"]:
                    if not (tmp / f["path"]).exists():
                        link_or_copy(final / f["path"], tmp / f["path"])
                artifacts.append(entry)
                log(f"{target.name}: {fmt} {variant} up to date")
                continue
            log(f"{target.name}: exporting {fmt} {variant}…")
            start = time.perf_counter()
            try:
                files = exporters[fmt].export_variant(source, variant, tmp, target)
            except OSError as exc:  # disk full, permissions: the atomic folder is removed on the way out
                raise EdgepackError(f"{target.name}: writing {fmt} {variant} failed ({exc.strerror or exc}); "
                                    f"free space under {final.parent} and re-run") from None
            seconds = time.perf_counter() - start
            if not files:
                raise EdgepackError(f"{target.name}: the {fmt} exporter wrote no file for {variant}")
            artifacts.append({
                "format": fmt, "variant": variant,
                "files": [file_entry(f, tmp) for f in files if not _is_baseline(f, tmp)],
                "baseline_files": [file_entry(f, tmp) for f in files if _is_baseline(f, tmp)],
                "export_seconds": round(seconds, 2), "exporter_version": EXPORTERS[fmt].version,
                "edgepack": __version__, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            log(f"{target.name}: {fmt} {variant} written in {seconds:.1f} s")
        for exporter in exporters.values():
            exporter.complete(tmp)
        listed = {f["path"] for a in artifacts for f in a["files"] + a["baseline_files"]}
        shared = sorted(p for p in tmp.rglob("*") if p.is_file() and p.relative_to(tmp).as_posix() not in listed)
        write_json(tmp / MANIFEST, {
            "edgepack": __version__,
            "target": target.name,
            "context_length": target.context_length,
            "source": {"slug": source.slug, "sha256": source.sha256, "origin": source.origin, "path": str(source.path)},
            "libraries": library_versions(),
            "shared_files": [file_entry(f, tmp) for f in shared],  # every other file in the folder
            "artifacts": artifacts,
        })
    return final


def _is_baseline(path: Path, root: Path) -> bool:
    """Files under baseline/ are a plain reference build that validate compares the variant with."""
    return path.relative_to(root).parts[0] == BASELINE_DIR
