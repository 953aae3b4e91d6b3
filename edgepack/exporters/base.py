"""The Exporter interface and the registry every format module registers itself in."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edgepack import __version__
from edgepack.source import Source
from edgepack.targets import TargetSpec

EXPORTERS: dict[str, type["Exporter"]] = {}


def register(cls: type["Exporter"]) -> type["Exporter"]:
    """Class decorator: make an exporter available under its format name."""
    EXPORTERS[cls.format] = cls
    return cls


def reusable_entries(old: dict | None, source: Source, target: TargetSpec, fmt: str,
                     folder: Path) -> dict[str, dict]:
    """Variants of folder's existing manifest (old) that are still exactly what an export now would write, and
    whose files are all still there at the size the manifest says (a deleted file means: build it again)."""
    if not old or old.get("source", {}).get("sha256") != source.sha256 or old.get("context_length") != target.context_length:
        return {}
    intact = lambda files: all((folder / f["path"]).is_file() and (folder / f["path"]).stat().st_size == f["bytes"]
                               for f in files)
    if not intact(old.get("shared_files", [])):
        return {}
    version = EXPORTERS[fmt].version
    return {
        a["variant"]: a for a in old["artifacts"]
        if a["format"] == fmt and a.get("exporter_version") == version and a.get("edgepack") == __version__
        and intact(a["files"] + a.get("baseline_files", []))
    }


class Exporter:
    """Turns a source model into one format's variants. Subclasses set `format` and `version`."""

    format: ClassVar[str]
    version: ClassVar[str] = "1"  # bump when output for the same inputs changes, so old exports are rebuilt
    # True when the variants share nothing while exporting: each then gets a process of its own in a multi-part
    # export, so one variant's leftovers do not sit under the next one's peak
    independent_variants: ClassVar[bool] = False

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this exporter cannot run on this machine (a missing package…), or None when it can."""
        return None

    @classmethod
    def notes(cls) -> str:
        """What a user should know about this exporter on this machine (shown by doctor)."""
        return ""

    def write_shared(self, source: Source, out: Path, target: TargetSpec) -> None:
        """Files every variant of the target shares (config, tokenizer with its chat template)."""
        source.copy_model_files(out)

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        """Write one variant under out; return the files written."""
        raise NotImplementedError

    def complete(self, out: Path) -> None:
        """Shared files that depend on every variant in the folder, exported now or kept from before (called once
        they are all there, before the manifest is written)."""

    def finish(self) -> None:
        """Remove whatever the exporter kept between variants (called once, after the last, even on failure)."""
