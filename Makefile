# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, from the CPU wheel on this machine's disk; otherwise pip would pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: demo test lint install install-test system-deps test-venvs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## system packages the tests need (chromium for the browser test, Java 17 for Spark)
system-deps:
	bash scripts/install-system-deps.sh

## venvs of the real clients the tests drive (clip-retrieval's ClipClient), built once per machine
test-venvs:
	@bash scripts/install-test-venvs.sh clip-retrieval >/dev/null

demo: install
	$(BIN)/clipsearch demo --port $(PORT)

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

test: install-test system-deps test-venvs lint
	@$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) demo-data .pytest_cache .ruff_cache
