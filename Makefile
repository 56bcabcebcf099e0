# Two commands do everything (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean jsipfs

$(STAMP): pyproject.toml scripts/sysdeps.sh
	bash scripts/sysdeps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint,examples]'
	# The OCR example's real model; --no-deps: its own deps are an OpenCV pipeline we never import.
	$(BIN)/python -m pip install -q --no-deps rapidocr==3.10.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meshrun demo

# The real IPFS daemon the storage tests run against (js-ipfs from npm, cached in
# ~/.cache/meshrun/jsipfs). Without Node.js/npm the daemon tests are skipped, not failed.
jsipfs:
	@bash scripts/install-jsipfs.sh || echo "warning: js-ipfs not installed; IPFS daemon tests will be skipped" >&2

# The job machines own every lifecycle decision, so their branches are covered by
# tests that start no process (>= 95 %); then the whole suite.
LIFECYCLE_TESTS := tests/protocol/test_lifecycle.py tests/protocol/test_policy.py \
	tests/protocol/test_receipts.py tests/protocol/test_verification.py
test: $(STAMP) jsipfs
	$(BIN)/pytest -q -p no:cacheprovider $(LIFECYCLE_TESTS) --cov=protocol.lifecycle \
		--cov=protocol.policy --cov=protocol.receipts --cov=protocol.verification \
		--cov-branch --cov-fail-under=95 \
		--cov-report=term-missing:skip-covered
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy protocol crypto storage node benchmarks cli.py
	$(BIN)/lint-imports

# Figures against same-run baselines (benchmarks/README.md); a few minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/meshrun bench --json-out benchmarks/latest.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
