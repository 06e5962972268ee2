# The two commands of the README:
#   make book   build the HTML book on the offline default (fast mode)
#   make test   run the test suite
# Both start from nothing but Python: the first run creates .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Chapters run in fast mode unless the caller says otherwise.
export GILIB_FAST_MODE ?= 1

.PHONY: book test bench bench-paper venv clean

venv: $(STAMP)

# torch is installed first and by exact version: pip then takes the CPU wheel
# instead of resolving a multi-GB CUDA build for a bare `torch` requirement.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	# --all: re-execute every chapter even when only gilib changed.
	$(BIN)/jupyter-book build . --all -W -n --keep-going

test: $(STAMP)
	$(BIN)/python -m pytest

# Figures, never assertions. The comparison runs the reference's setting
# (500 steps, 500 starts) on five CoLA sentences: about half an hour on 2 cores.
bench: $(STAMP)
	$(BIN)/python bench/attack_speed.py
	$(BIN)/python bench/reference_comparison.py --jobs 2

# The paper's full setting (2000 steps): long-running, not part of make test.
bench-paper: $(STAMP)
	$(BIN)/python bench/reference_comparison.py --paper --jobs 2

clean:
	rm -rf _build
