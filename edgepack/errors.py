"""The one exception type edgepack raises for anything a user can fix, and what a dead child process is told as."""

from __future__ import annotations

import shutil
from pathlib import Path

# Below this much free disk, a child that died most likely died writing: a write into a memory-mapped file on a full
# disk is a SIGBUS, not an exception, so the process vanishes exactly as one the kernel killed for memory does (CI
# once ran out of disk in the middle of a .tflite quantization, and the old message said "out of memory?")
FULL_DISK_BYTES = 1 << 30


class EdgepackError(Exception):
    """A failure a user can act on: the message says what, where, and what to do."""


def died(process: str, disk: Path, again: str, detail: str = "") -> EdgepackError:
    """The one error line for a child process (`process` names it: "tflite: the quantizer's process") that vanished
    while writing under `disk`: a full disk where that is the likely cause (its free bytes are read now), memory
    otherwise. `detail` (an exit code) goes in the parentheses; `again` ends the line."""
    detail = f"{detail}; " if detail else ""
    free = _free_bytes(Path(disk))
    if free is not None and free < FULL_DISK_BYTES:
        return EdgepackError(f"{process} died ({detail}{free / 1e6:.0f} MB free on the disk holding {disk}: full "
                             f"disk?); free disk space there and {again}")
    return EdgepackError(f"{process} died ({detail}killed: out of memory?); free memory or use a machine with more, "
                         f"and {again}")


def in_child(fn, *args, process: str, disk: Path, again: str):
    """fn(*args) in a spawned process of its own (spawn, not fork: torch's thread pools do not survive a fork), its
    result returned; a process that dies is died()'s one error line. Exceptions fn raises pass through."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        try:
            return child.submit(fn, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise died(process, disk, again) from None


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None
