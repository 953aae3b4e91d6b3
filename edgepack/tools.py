"""Helper tools that a wheel cannot carry, built once into the user's cache the first time a command needs them.

- llama.cpp's converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ folders): the cpu target's base
  GGUF. It comes from the sdist of the installed llama-cpp-python, which vendors llama.cpp whole, so converter,
  quantizer and runtime are one llama.cpp version.
- llama.cpp's llama-imatrix and llama-quantize, compiled with cmake from that same sdist: the cpu target's
  importance-matrix quantization needs them, because the quantize parameters' imatrix is a C++ map that ctypes
  cannot build.
- tflite-runtime 2.14, the TFLite package older apps still name, in a NumPy-1 environment of its own (it fails to
  import beside NumPy 2): validate reports whether each .tflite loads and runs there.
- MLX with mlx-lm, in an environment of its own: mlx-lm 0.32 requires transformers >= 5.7 and edgepack's stack is
  pinned to 4.57.6 (README, "Versions, and why"). The mac target is converted and run there.

Each is looked for first where a user may have put it ($EDGEPACK_LLAMA_CONVERT, $EDGEPACK_LLAMA_TOOLS or PATH),
then in <cache>/tools/. `edgepack tools --build` builds them ahead of time (make install does); `edgepack doctor`
says where each one is.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgepack.errors import EdgepackError

CONVERT_SCRIPT = "convert_hf_to_gguf.py"
LLAMA_TOOLS = ("llama-imatrix", "llama-quantize")
LEGACY_RUNTIME = "tflite-runtime 2.14"
LEGACY_PACKAGES = ("numpy<2", "tflite-runtime==2.14.0")
MLX = "mlx 0.32.4 + mlx-lm 0.32.2"
# mlx-lm does not depend on mlx on Linux, and Linux needs mlx's CPU backend by its extra; transformers is the
# version this environment was measured with (mlx-lm asks for >= 5.7).
MLX_PACKAGES = ("mlx[cpu]==0.32.4" if sys.platform == "linux" else "mlx==0.32.4", "mlx-lm==0.32.2",
                "transformers==5.23.0")


def tools_root() -> Path:
    from edgepack.source import cache_root

    return cache_root() / "tools"


def _llama_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise EdgepackError("llama-cpp-python is not installed; pip install edgepack (or make install) "
                            "installs it") from None


def _say(line: str) -> None:
    print(f"edgepack: {line}", file=sys.stderr, flush=True)


def _publish(built: Path, final: Path) -> None:
    """Move a finished build into place in one rename, so a build that was killed half-way is never found."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # another process finished first
        shutil.rmtree(built, ignore_errors=True)
        return
    os.replace(built, final)


def _llama_sdist(into: Path) -> Path:
    """The llama-cpp-python sdist of the installed version, unpacked under `into`; its llama.cpp folder."""
    version = _llama_version()
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                          "--quiet", "-d", str(into), f"llama-cpp-python=={version}"], capture_output=True, text=True)
    sdists = list(into.glob("*.tar.gz"))
    if got.returncode != 0 or not sdists:
        raise EdgepackError(f"cannot download the llama-cpp-python {version} sdist from PyPI "
                            f"({(got.stderr.strip().splitlines() or ['no output'])[-1]}); "
                            "set EDGEPACK_LLAMA_CONVERT / EDGEPACK_LLAMA_TOOLS to a llama.cpp checkout and build")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(into, filter="data")
    found = list(into.glob("*/vendor/llama.cpp"))
    if not found:
        raise EdgepackError(f"{sdists[0].name} holds no vendor/llama.cpp folder; llama-cpp-python changed its layout")
    return found[0]


# --- llama.cpp's converter -------------------------------------------------------------------------------------

def llama_convert_dir(build: bool = True) -> Path | None:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/, fetched on first need (build=True)."""
    cached = tools_root() / f"llama.cpp-convert-{_llama_version()}"
    for folder in (os.environ.get("EDGEPACK_LLAMA_CONVERT"), cached):
        if folder and (Path(folder) / CONVERT_SCRIPT).is_file():
            return Path(folder)
    if not build:
        return None
    _say(f"fetching llama.cpp's converter (llama-cpp-python {_llama_version()} sdist) into {cached}, once")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        llama = _llama_sdist(Path(tmp))
        built = Path(tmp) / "convert"
        built.mkdir()
        for name in (CONVERT_SCRIPT, "conversion", "gguf-py"):
            (shutil.copytree if (llama / name).is_dir() else shutil.copy2)(llama / name, built / name)
        _publish(built, cached)
    return cached


# --- llama.cpp's llama-imatrix and llama-quantize --------------------------------------------------------------

def llama_tools(build: bool = True) -> dict[str, Path] | None:
    """llama-imatrix and llama-quantize: $EDGEPACK_LLAMA_TOOLS, the cache, or PATH; compiled into the cache on
    first need (build=True, a few minutes on 2 cores). None when they are absent and cannot be built here (no
    cmake or C++ compiler): the caller then quantizes without an importance matrix and says so."""
    cached = tools_root() / f"llama.cpp-bin-{_llama_version()}-avx2"
    for folder in (os.environ.get("EDGEPACK_LLAMA_TOOLS"), cached):
        if folder and all((Path(folder) / name).is_file() for name in LLAMA_TOOLS):
            return {name: Path(folder) / name for name in LLAMA_TOOLS}
    if all(shutil.which(name) for name in LLAMA_TOOLS):
        return {name: Path(shutil.which(name)) for name in LLAMA_TOOLS}
    if not build or llama_build_missing():
        return None
    _build_llama_tools(cached)
    return {name: cached / name for name in LLAMA_TOOLS}


def llama_build_missing() -> str | None:
    """What this machine lacks to compile llama.cpp's tools, or None."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found (apt install cmake g++)" if missing else None


# AVX2, not -march=native: on a CPU that reports Intel AMX (this kind of cloud VM does), a native build runs
# Q4_0/Q4_1/Q8_0 matmuls on AMX tiles and dies at its first `ldtilecfg` (general protection fault). The Makefile
# builds llama-cpp-python with the same flags (LLAMA_CMAKE).
LLAMA_ISA = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]


def _build_llama_tools(final: Path) -> None:
    _say(f"building llama.cpp's {' and '.join(LLAMA_TOOLS)} (llama-cpp-python {_llama_version()} sdist) into "
         f"{final}, once; about 5 minutes on 2 cores")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        llama = _llama_sdist(Path(tmp))
        build = Path(tmp) / "build"
        _run(["cmake", "-S", llama, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF", *LLAMA_ISA], "cmake configure")
        _run(["cmake", "--build", build, "--target", *LLAMA_TOOLS, "-j", str(os.cpu_count() or 1)],
             "cmake build", progress=True)
        built = Path(tmp) / "bin"
        built.mkdir()
        for name in LLAMA_TOOLS:
            shutil.copy2(build / "bin" / name, built / name)
        _publish(built, final)


def _run(args: list, what: str, progress: bool = False) -> None:
    """Run a build step; with progress, cmake's "[ 42%]" shown on one line of stderr."""
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        step = re.match(r"\[\s*(\d+)%\]", line)
        if progress and step and sys.stderr.isatty():
            print(f"\redgepack: {what} {step.group(1)}%", end="", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    if proc.wait() != 0:
        errors = [line for line in tail if "error" in line.lower()] or tail or ["no output"]
        raise EdgepackError(f"{what} of llama.cpp's tools failed ({errors[-1][:200]}); "
                            "llama.cpp needs cmake and a C++17 compiler (apt install cmake g++)")


# --- tflite-runtime 2.14 ---------------------------------------------------------------------------------------

def legacy_runtime_python(build: bool = True) -> Path | None:
    """The python of the NumPy-1 environment holding tflite-runtime 2.14, created on first need (build=True);
    None when it is absent and cannot be made (tflite-runtime 2.14 has wheels for CPython 3.9 to 3.11 on x86-64
    and aarch64 Linux only)."""
    return _venv("tflite-runtime-2.14", LEGACY_RUNTIME, LEGACY_PACKAGES, "import tflite_runtime.interpreter", build,
                 "NumPy-1 environment", "about 1 minute")


def mlx_python(build: bool = True) -> Path | None:
    """The python of the environment holding MLX and mlx-lm, created on first need (build=True); None when it is
    absent and cannot be made (MLX has wheels for Linux x86-64 / aarch64 and Apple Silicon macOS)."""
    return _venv("mlx-0.32.4", MLX, MLX_PACKAGES, "import mlx.core, mlx_lm", build, "environment", "about 30 s")


def _venv(name: str, what: str, packages: tuple[str, ...], check: str, build: bool, kind: str,
          duration: str) -> Path | None:
    folder = tools_root() / name
    python = folder / "bin" / "python"
    if (folder / "ok").is_file():
        return python
    if not build:
        return None
    _say(f"creating {what}'s {kind} in {folder}, once ({duration})")
    # The venv is made in its final place (a venv's scripts name their own path); the marker is written last, so
    # a half-made one is remade.
    shutil.rmtree(folder, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(folder)],
             [str(python), "-m", "pip", "install", "--quiet", *packages],
             [str(python), "-c", check]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            _say(f"{what} cannot be installed here ({(done.stderr.strip().splitlines() or ['no output'])[-1][:160]})")
            return None
    (folder / "ok").write_text(" ".join(packages) + "\n")
    return python


# --- all of them -----------------------------------------------------------------------------------------------

def tool_rows() -> list[dict]:
    """Each helper tool, where it is (or why not), and what needs it: for doctor and `edgepack tools`."""
    from edgepack.native import llama_cpp_missing

    def where(found) -> str:
        if isinstance(found, dict):
            found = next(iter(found.values())).parent
        return str(found) if found else "not built yet (built on first need, or: edgepack tools --build)"

    rows = []
    if llama_cpp_missing():
        rows.append({"tool": "llama.cpp converter, llama-imatrix, llama-quantize", "where": llama_cpp_missing(),
                     "for": "cpu export"})
    else:
        rows.append({"tool": "llama.cpp convert_hf_to_gguf.py", "where": where(llama_convert_dir(build=False)),
                     "for": "cpu export (base GGUF)"})
        tools = llama_tools(build=False)
        rows.append({"tool": "llama.cpp llama-imatrix, llama-quantize",
                     "where": where(tools) if tools or not llama_build_missing() else llama_build_missing(),
                     "for": "cpu export (≤5-bit variants with an importance matrix)"})
    rows.append({"tool": LEGACY_RUNTIME, "where": where(legacy_runtime_python(build=False)),
                 "for": "validate (android: does each .tflite load in the older runtime)"})
    rows.append({"tool": MLX, "where": where(mlx_python(build=False)), "for": "mac export and its runner"})
    return rows


def build_all() -> None:
    """Fetch or build every helper tool that is missing (make install calls this through `edgepack tools --build`)."""
    if llama_convert_dir() is None or llama_tools() is None:
        raise EdgepackError(f"llama.cpp's tools cannot be built here: {llama_build_missing()}")
    for make, what in ((legacy_runtime_python, LEGACY_RUNTIME), (mlx_python, MLX)):
        if make() is None:
            raise EdgepackError(f"{what}'s environment cannot be created here (see the line above)")
