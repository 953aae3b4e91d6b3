"""Living with native libraries (llama.cpp, onnxruntime): whether they are installed, and quieting their logging."""

from __future__ import annotations

import contextlib
import io
import os


@contextlib.contextmanager
def quiet_stderr():
    """Send fd 2 (and Python's sys.stderr, where llama-cpp-python forwards llama.cpp's log) to nowhere for the
    duration: edgepack prints its own one-line errors."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def modules_missing(*modules: str) -> str | None:
    """Why one of these Python modules cannot be imported here, or None (exporters and runners share this)."""
    import importlib.util

    for module in modules:  # find_spec, not import: some of these print warnings and take seconds to import
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (make install, or pip install -e .)"
    return None


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None (the cpu exporter and runner both need it)."""
    return modules_missing("llama_cpp")
