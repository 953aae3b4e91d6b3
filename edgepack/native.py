"""Living with native libraries (llama.cpp, onnxruntime): whether they are installed, and quieting their logging."""

from __future__ import annotations

import contextlib
import io
import os


def cpu_threads() -> int:
    """Threads a runtime or quantizer may use: $EDGEPACK_THREADS, else every core. Runtimes spin while they wait
    for their own threads, so two processes that each take every core slow each other far more than twice (seen:
    a tiny model's llama.cpp bench beside another busy process, over 4 min instead of seconds); when several run
    at once (make test's two workers), give each its share."""
    value = os.environ.get("EDGEPACK_THREADS", "")
    return max(1, int(value)) if value.isdigit() else os.cpu_count() or 1


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


def import_quietly(*modules: str) -> None:
    """Import optional modules that log warnings to stderr as they load (torchao, which litert-torch installs and
    transformers imports whenever it loads a model, reports missing CUDA kernels), so edgepack's own output stays
    one line on error. Modules that are absent or already imported are left alone."""
    import importlib.util
    import logging
    import sys

    logging.disable(logging.WARNING)  # torch's pytree registrations log through a handler of their own
    try:
        with quiet_stderr():
            for module in modules:  # find_spec of a submodule imports its parent package, so it is inside too
                if module not in sys.modules and importlib.util.find_spec(module) is not None:
                    __import__(module)
    finally:
        logging.disable(logging.NOTSET)


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None (the cpu exporter and runner both need it)."""
    return modules_missing("llama_cpp")
