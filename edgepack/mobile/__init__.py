"""App-ready bundles: a target's files copied into an app's layout, with a sha256 manifest and a zip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgepack.artifacts import MANIFEST, model_dir, read_manifest, sha256_file, write_json
from edgepack.errors import EdgepackError
from edgepack.source import Source

BUNDLE_MANIFEST = "bundle-manifest.json"


def build_bundle(platform: str, source: Source, dist: Path) -> Path:
    """dist/<slug>/bundles/<platform>/ and <platform>.zip from the exported target folder."""
    folder = model_dir(dist, source.slug)
    target_dir = folder / platform  # the platform is the target's name
    manifest = read_manifest(target_dir)
    if manifest is None:
        raise EdgepackError(f"no {platform} artifacts under {target_dir}; run edgepack export --target "
                            f"{platform} first (see edgepack doctor for what is available)")
    out = folder / "bundles" / platform
    tmp = out.with_name(f".{platform}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(target_dir, tmp, ignore=shutil.ignore_patterns(MANIFEST))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_json(tmp / BUNDLE_MANIFEST, {
        "platform": platform, "model": source.slug,
        "files": {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    archive = shutil.make_archive(str(out), "zip", out)
    return Path(archive)


def verify_bundle(folder: Path) -> list[str]:
    """Re-hash every file a bundle's manifest lists; one line per problem (empty when all match)."""
    path = folder / BUNDLE_MANIFEST
    if not path.is_file():
        raise EdgepackError(f"{folder}: no {BUNDLE_MANIFEST}; this is not an edgepack bundle")
    listed = json.loads(path.read_text())["files"]
    problems = []
    for name, facts in listed.items():
        file = folder / name
        if not file.is_file():
            problems.append(f"missing: {name}")
        elif sha256_file(file) != facts["sha256"]:
            problems.append(f"sha256 mismatch: {name}")
    extra = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(listed) - {BUNDLE_MANIFEST}
    problems += [f"not in manifest: {name}" for name in sorted(extra)]
    return problems
