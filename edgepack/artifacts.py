"""Artifacts on disk: the dist layout, manifests, and atomic target folders (read by exporters and runners alike)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgepack.errors import EdgepackError

MANIFEST = "manifest.json"
BASELINE_DIR = "baseline"  # an exporter's plain reference build of a variant, validated beside it for comparison
LIBRARIES = ("edgepack", "torch", "transformers", "numpy", "gguf", "onnx", "onnxruntime", "coremltools",
             "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "llama_cpp_python", "executorch", "torchao")


@dataclass(frozen=True)
class Artifact:
    """One exported variant: what a runner loads."""

    target: str
    format: str
    variant: str
    dir: Path  # the target folder (or the source folder for target 'source')
    files: tuple[Path, ...]  # the first is the model file
    baseline: tuple[Path, ...] = ()  # a plain build of the same variant, when the exporter made one

    @property
    def key(self) -> str:
        return f"{self.target}/{self.format}/{self.variant}"

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def model_dir(dist: Path, slug: str) -> Path:
    return Path(dist) / slug


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path, root: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(target_dir: Path) -> dict | None:
    """The target folder's manifest, None when there is none; a damaged one is an error."""
    path = Path(target_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["artifacts"]  # noqa: B018 - the one key every reader needs
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgepackError(f"{path}: damaged manifest ({exc}); re-export with --force") from None
    return manifest


def artifacts_in(model_folder: Path) -> list[Artifact]:
    """Every exported variant under dist/<slug>/, from the manifests, in a stable order."""
    found = []
    for target_dir in sorted(p for p in Path(model_folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = read_manifest(target_dir)
        if manifest is None:
            continue
        for entry in manifest["artifacts"]:
            for f in entry["files"] + entry.get("baseline_files", []):
                path = target_dir / f["path"]
                if not path.is_file() or path.stat().st_size != f["bytes"]:
                    problem = "missing" if not path.is_file() else f"truncated or changed ({path.stat().st_size} bytes)"
                    raise EdgepackError(f"{path}: {problem}, the manifest says {f['bytes']} bytes; "
                                        f"re-export with --force")
            files = tuple(target_dir / f["path"] for f in entry["files"])
            baseline = tuple(target_dir / f["path"] for f in entry.get("baseline_files", []))
            found.append(Artifact(manifest["target"], entry["format"], entry["variant"], target_dir, files, baseline))
    return found


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it into place only when the body completes.

    An interrupted or failed build leaves only a hidden .tmp-* folder (removed on the next build) and the
    previous complete folder, if any, untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    old = final.parent / f".{final.name}.old"
    if old.exists() and not final.exists():  # a swap was interrupted between its two renames
        os.replace(old, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the finished folder private
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: Path, data) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of src at dst (a copy where the filesystem has none): files kept from another build."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
