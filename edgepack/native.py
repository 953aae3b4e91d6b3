"""Living with native libraries (llama.cpp): whether they are installed, and quieting their logging."""

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


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None (the cpu exporter and runner both need it)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return None
