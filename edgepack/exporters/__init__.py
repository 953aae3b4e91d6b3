"""Exporters: one module per format, one registry, and the atomic build of a target folder."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from edgepack import __version__
from edgepack.artifacts import (BASELINE_DIR, MANIFEST, atomic_dir, file_entry, library_versions, link_or_copy,
                                read_manifest, write_json)
from edgepack.errors import EdgepackError, died
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
        reuse = reusable_entries(old, source, target, fmt, final)
        plan += [(fmt, v, None if force else reuse.get(v)) for v in names]
    asked = {(fmt, v) for fmt, v, _ in plan}
    for entry in old["artifacts"] if old else []:  # exported before, not asked for now: keep if still current
        fmt = entry["format"]
        if (fmt, entry["variant"]) not in asked and fmt in EXPORTERS and \
                entry["variant"] in reusable_entries(old, source, target, fmt, final):
            plan.append((fmt, entry["variant"], entry))
    if old and all(entry for _, _, entry in plan) and len(plan) == len(old["artifacts"]):
        log(f"{target.name}: up to date ({', '.join(v for _, v, _ in plan)}); --force rebuilds")
        return final
    exporters = {fmt: EXPORTERS[fmt]() for fmt, _, _ in plan}
    todo = {fmt: [v for f, v, entry in plan if f == fmt and not entry] for fmt in exporters}
    units = []  # a format's variants together, or each alone where the exporter's variants are independent
    for fmt, names in todo.items():
        units += [(fmt, [v]) for v in names] if exporters[fmt].independent_variants else [(fmt, names)] if names else []
    # More than one unit to build: each in a process of its own, so what a converter leaves resident (litert-torch
    # keeps its graphs, ai-edge-quantizer and torch.export their buffers) does not stack under the next one's peak
    # (the 494M model's whole android target in one process: 8.80 GB; each format alone at most 5.1 GB).
    isolate = len(units) > 1
    with atomic_dir(final) as tmp, _finishing(exporters.values()):
        for exporter in exporters.values():
            exporter.write_shared(source, tmp, target)
        for fmt, variant, entry in plan:
            if entry:
                for f in entry["files"] + entry.get("baseline_files", []) + old["shared_files"]:
                    if not (tmp / f["path"]).exists():
                        link_or_copy(final / f["path"], tmp / f["path"])
                log(f"{target.name}: {fmt} {variant} up to date")
        built = {}
        for fmt, names in units:
            args = (fmt, names, source, tmp, target)
            built |= _export_in_child(*args, log=log) if isolate else _export_variants(exporters[fmt], *args, log=log)
        artifacts = [entry or built[fmt, variant] for fmt, variant, entry in plan]
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


def _export_variants(exporter: Exporter, fmt: str, variants: list[str], source: Source, tmp: Path,
                     target: TargetSpec, log=print) -> dict[tuple[str, str], dict]:
    """Write each variant of one format into the target's folder; its manifest entries by (format, variant)."""
    entries = {}
    for variant in variants:
        log(f"{target.name}: exporting {fmt} {variant}…")
        start = time.perf_counter()
        try:
            files = exporter.export_variant(source, variant, tmp, target)
        except OSError as exc:  # disk full, permissions: the atomic folder is removed on the way out
            raise EdgepackError(f"{target.name}: writing {fmt} {variant} failed ({exc.strerror or exc}); "
                                f"free space under {tmp.parent} and re-run") from None
        seconds = time.perf_counter() - start
        if not files:
            raise EdgepackError(f"{target.name}: the {fmt} exporter wrote no file for {variant}")
        entries[fmt, variant] = {
            "format": fmt, "variant": variant,
            "files": [file_entry(f, tmp) for f in files if not _is_baseline(f, tmp)],
            "baseline_files": [file_entry(f, tmp) for f in files if _is_baseline(f, tmp)],
            "export_seconds": round(seconds, 2), "exporter_version": EXPORTERS[fmt].version,
            "edgepack": __version__, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        log(f"{target.name}: {fmt} {variant} written in {seconds:.1f} s")
    return entries


def _child_main(conn, fmt: str, variants: list[str], source: Source, tmp: Path, target: TargetSpec) -> None:
    """In a spawned process: export one format's variants, sending log lines, then the entries or the error."""
    exporter = EXPORTERS[fmt]()
    try:
        send = lambda line: conn.send(("log", line))  # noqa: E731
        entries = _export_variants(exporter, fmt, variants, source, tmp, target, log=send)
        conn.send(("done", entries))
    except EdgepackError as exc:
        conn.send(("error", str(exc)))
    except BaseException as exc:  # a bug: its traceback goes back with it
        conn.send(("crash", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        exporter.finish()
        conn.close()


class ChildTraceback(Exception):
    """The traceback of an exception raised in a format's export process (shown under --debug)."""


def _export_in_child(fmt: str, variants: list[str], source: Source, tmp: Path, target: TargetSpec,
                     log=print) -> dict[tuple[str, str], dict]:
    """_export_variants in a spawned process of its own (spawn, not fork: torch's thread pools do not survive a
    fork; not a daemon: the tflite exporter starts a process of its own); its log lines are passed on as they come.
    A child that dies (out of memory) is one error line."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(child, fmt, variants, source, tmp, target))
    process.start()
    child.close()
    try:
        while True:
            try:
                kind, *message = parent.recv()
            except EOFError:
                process.join()
                raise died(f"{target.name}: the {fmt} export's process", tmp, "export again",
                           f"exit code {process.exitcode}") from None
            if kind == "log":
                log(message[0])
            elif kind == "done":
                return message[0]
            elif kind == "error":
                raise EdgepackError(message[0])
            else:
                raise RuntimeError(f"{message[0]} (in the {fmt} export's process)") from ChildTraceback(message[1])
    finally:
        parent.close()
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()


def _is_baseline(path: Path, root: Path) -> bool:
    """Files under baseline/ are a plain reference build that validate compares the variant with."""
    return path.relative_to(root).parts[0] == BASELINE_DIR
