"""pytest plugin: `pytest --edgepack-dist dist/<slug>` collects one test per target × variant × check.

Thresholds come from targets.toml (or --edgepack-targets); measurement is edgepack.runtime.parity's, the same
code `edgepack validate` runs. JUnit XML comes from pytest's own --junitxml.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.artifacts import Artifact, artifacts_in, read_manifest
from edgepack.errors import EdgepackError


def pytest_addoption(parser):
    group = parser.getgroup("edgepack", "edgepack parity gate")
    group.addoption("--edgepack-dist", metavar="DIR", help="a dist/<model-slug> folder to gate on")
    group.addoption("--edgepack-targets", metavar="FILE", help="targets file with the thresholds")
    group.addoption("--edgepack-model", metavar="M", help="source model, when the manifest's source path is gone")


class ParityFailure(AssertionError):
    pass


class _Session:
    """Everything the collected checks share: the source, one reference trace, one measurement per artifact."""

    def __init__(self, model: str | None):
        self.model = model
        self._ref = None
        self._results: dict[str, dict] = {}

    def source_for(self, artifact: Artifact):
        from edgepack.source import resolve

        manifest = read_manifest(artifact.dir)
        source = resolve(self.model or manifest["source"]["path"])
        if source.sha256 != manifest["source"]["sha256"]:
            raise EdgepackError(f"{artifact.dir}: exported from other weights than {source.path}; pass --edgepack-model")
        return source

    def result(self, artifact: Artifact, thresholds: dict) -> dict:
        from edgepack.runtime.parity import reference_trace, validate_artifact

        if artifact.key not in self._results:
            if self._ref is None:
                self._ref = reference_trace(self.source_for(artifact))
            self._results[artifact.key] = validate_artifact(artifact, thresholds, self._ref)
        return self._results[artifact.key]


class ParityCheck(pytest.Item):
    def __init__(self, *, artifact: Artifact, check: str, thresholds: dict, shared: _Session, **kwargs):
        super().__init__(**kwargs)
        self.artifact, self.check, self.thresholds, self.shared = artifact, check, thresholds, shared

    def runtest(self):
        outcome = next(c for c in self.shared.result(self.artifact, self.thresholds)["checks"] if c["check"] == self.check)
        if not outcome["passed"]:
            raise ParityFailure(f"{self.artifact.key}: {outcome['metric']} = {outcome['value']:.6g}, "
                                f"needs {outcome['op']} {outcome['bound']:g}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (ParityFailure, EdgepackError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.artifact.dir, None, f"{self.artifact.key}[{self.check}]"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    dist = config.getoption("edgepack_dist")
    if not dist:
        return
    from edgepack.targets import load_targets

    targets = load_targets(config.getoption("edgepack_targets"))
    shared = _Session(config.getoption("edgepack_model"))
    folder = Path(dist)
    if not folder.is_dir():
        raise pytest.UsageError(f"--edgepack-dist {dist}: no such folder")
    for artifact in artifacts_in(folder):
        thresholds = targets.thresholds(artifact.format, artifact.variant, artifact.target)
        for check in thresholds:
            items.append(ParityCheck.from_parent(session, name=f"{artifact.key}[{check}]", artifact=artifact,
                                                 check=check, thresholds=thresholds, shared=shared))
