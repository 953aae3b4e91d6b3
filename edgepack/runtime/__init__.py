"""Runtime: one Runner protocol, a runner per format, and the parity, bench and report built on them."""

from __future__ import annotations

from edgepack.artifacts import Artifact
from edgepack.errors import EdgepackError
from edgepack.runtime.base import RUNNERS, Runner, register

# Importing a runner module registers it for its format.
for _module in ("reference", "llamacpp", "ort", "litert", "litertlm", "coreml", "mlx", "executorch"):
    __import__(f"edgepack.runtime.{_module}")

__all__ = ["RUNNERS", "Runner", "register", "open_runner"]


def open_runner(artifact: Artifact) -> Runner:
    """A loaded runner for an artifact, or one clear error when its format has no runner here."""
    cls = RUNNERS.get(artifact.format)
    if cls is None:
        raise EdgepackError(f"{artifact.key}: no runner for format '{artifact.format}' yet (see edgepack doctor)")
    return cls().load(artifact)
