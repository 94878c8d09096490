# The verbs people type. `make serve` and `make test` work on a fresh clone:
# they create .venv, install the package with its extras, build the Cython
# extensions, then run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# onnxruntime-gpu where an NVIDIA driver answers, the CPU wheel elsewhere.
RUNTIME_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(RUNTIME_EXTRA)
MODELS := examples/claims/models
PIPELINES := examples/claims/pipelines

.PHONY: help serve test fuzz build demo bench bench-micro protos models clean node-deps

help:
	@echo "make serve        set up .venv (install, Cython build) and serve the claims demo on 127.0.0.1:8001"
	@echo "make test         the same set-up, then the whole test suite (compiled, then the pure-Python references)"
	@echo "make fuzz         the property and fuzz tests at 10x their examples (a longer bug hunt)"
	@echo "make demo         serve the demo in-process and send it a burst of decisions"
	@echo "make build        only the set-up: .venv, install, Cython extensions"
	@echo "make models       build the demo models into $(MODELS)"
	@echo "make bench        front-end benchmark (bench/RESULTS.md); make bench-micro: the Cython core's"
	@echo "make protos       regenerate kernel/_proto from proto/"
	@echo "make node-deps    install the Node client's packages (npm ci; make test does it when npm is there)"
	@echo "make clean        remove build outputs, the compiled extensions and the Node client's node_modules"

# A .venv whose Python is missing or older than requires-python (a first `make` on an old python3, before
# `make serve PYTHON=python3.11`) is made again with $(PYTHON); an old $(PYTHON) is refused before any .venv is made.
NEW_ENOUGH := -c 'import sys; sys.exit(sys.version_info < (3, 11))'

$(STAMP): pyproject.toml setup.py ext/*.pyx ext/*.pxd ext/*.pxi
	@$(PY) $(NEW_ENOUGH) 2>/dev/null || { \
		$(PYTHON) $(NEW_ENOUGH) || { echo "$(PYTHON) is not Python 3.11 or newer (requires-python): name one that is, e.g. make $(MAKECMDGOALS) PYTHON=python3.11"; exit 1; }; \
		echo "$(PYTHON) -m venv --clear $(VENV)"; $(PYTHON) -m venv --clear $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# The editable install compiles ext/*.pyx into kernel/_ext/ (setup.py).
	$(PY) -m pip install --quiet -e ".[$(RUNTIME_EXTRA),test,bench]"
	$(PY) -c "import kernel._ext.bytes_codec, kernel._ext.wire, kernel._ext.decision_wire, kernel._ext.scheduler, kernel._ext.rules, kernel._ext.rowcodec, kernel._ext.auditscan, kernel._ext.infer_scan" || { echo "Cython extensions did not build"; exit 1; }
	rm -f $(VENV)/.installed-*
	touch $@

build: $(STAMP)

$(MODELS)/claims_triage/1/model.onnx: $(STAMP) examples/claims/*.py
	$(PY) examples/claims/build_models.py --out $(MODELS)

models: $(MODELS)/claims_triage/1/model.onnx

serve: models
	$(PY) -m kernel serve --models $(MODELS) --pipelines $(PIPELINES)

demo: models
	$(PY) -m kernel demo --models $(MODELS) --pipelines $(PIPELINES)

# The Node client (clients/node/) that tests/test_node_client.py runs: installed once from its lock file
# (the stamp sits inside node_modules, so `npm ci` wiping it forgets the stamp too). Without npm the test
# is skipped, so the set-up is too (and a failed install skips it with a warning rather than failing
# the suite). --ignore-scripts: no package needs one (protobufjs's postinstall only
# checks version pins), and none runs during `make test`.
NODE_STAMP := clients/node/node_modules/.installed

$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo "npm ci --prefix clients/node --no-audit --no-fund --ignore-scripts"; \
		npm ci --prefix clients/node --no-audit --no-fund --ignore-scripts && touch $@ || \
			echo "warning: npm ci failed (no registry?): tests/test_node_client.py is skipped"; \
	else \
		echo "note: npm not found: the Node client is not installed and tests/test_node_client.py is skipped"; \
	fi

node-deps: $(NODE_STAMP)

# The whole suite on the compiled core, then the serving and scheduling suites
# again on the pure-Python references (AIOS_PURE_PYTHON=1): both must pass.
PURE_SUITES := tests/test_oip.py tests/test_bad_input.py \
	tests/test_pipelines.py tests/test_pipeline_codec.py tests/test_decisions.py \
	tests/test_scheduling_grpc.py tests/test_fuzz_oip.py tests/test_wire.py tests/test_record_tail.py \
	tests/test_batch_finisher.py tests/test_answer_later.py tests/test_poller_inline.py \
	tests/test_cli.py::test_serve_drains_in_flight_calls_on_sigterm \
	tests/test_cli.py::test_decide_prints_the_decision_and_names_bad_fields tests/test_audit_damage.py
# (Suites that run every implementation side by side in the first pass are not repeated: test_scheduling,
# test_policy_backends, test_policy_semantics and test_policy_differential take every evaluator there, and
# test_decision_wire both twins whatever AIOS_PURE_PYTHON says, test_audit_scan both in the first pass; test_audit_damage runs the
# open's frame walk on its reference again. Of the command-line tests only a served
# kernel's whole path runs twice: the client commands and start-up errors do not depend on which core is
# built. The second pass draws 0.3× the hypothesis examples (tests/fuzz_budget.py): the first drew them all
# against the same properties. CI's 10 minutes are tight on a slow host.)
PURE_FUZZ_SCALE := 0.3
# Property and fuzz tests only, at 10× the examples: a longer bug hunt than `make test` can afford.
FUZZ_SUITES := tests/test_fuzz_oip.py tests/test_fuzz_kernel_api.py tests/test_wire.py tests/test_decision_wire.py tests/test_infer_scan.py \
	tests/test_decode_fast_path.py tests/test_record_tail.py tests/test_pipeline_codec.py \
	tests/test_pipeline_codec_differential.py tests/test_policy_differential.py tests/test_policy_analysis_brute.py \
	tests/test_scheduling_differential.py tests/test_audit_proofs.py tests/test_kill_cycles.py

# Each pass on TEST_WORKERS processes (pytest-xdist), a test file per process at a time (module-scoped
# kernels are started once per file, as in a serial run): CI's 2 cores halve the wall time (7:40 -> 4:40 here).
# `make test TEST_WORKERS=0` runs serially.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP) node-deps
	$(PY) -m pytest -q $(XDIST)
	AIOS_PURE_PYTHON=1 AIOS_FUZZ_SCALE=$(PURE_FUZZ_SCALE) $(PY) -m pytest -q $(XDIST) $(PURE_SUITES)

fuzz: $(STAMP)
	AIOS_FUZZ_SCALE=10 $(PY) -m pytest -q $(FUZZ_SUITES)
	AIOS_PURE_PYTHON=1 AIOS_FUZZ_SCALE=10 $(PY) -m pytest -q tests/test_fuzz_oip.py tests/test_record_tail.py

bench-micro: $(STAMP)
	$(PY) -m pytest -q tests/bench -o addopts="" --benchmark-only
	$(PY) -m bench.scheduler_micro
	$(PY) -m bench.prepare_micro

bench: $(STAMP)
	$(PY) -m bench.frontends

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf build dist *.egg-info kernel/_ext/*.so ext/*.c ext/*.html .pytest_cache clients/node/node_modules
	rm -f $(VENV)/.installed-*  # the extensions are gone: the next make installs and builds again
