# The two commands of the README:
#   make book   build the HTML book on the offline default (fast mode)
#   make test   run the test suite (every test; chapters the book build
#               executed are not executed again: gilib.book.executed)
# Both start from nothing but Python: the first run creates .venv.
# Also:
#   make test-fast      the contributor's tier: every test but the slow ones
#                       (no chapter execution, no Flower round), a few minutes
#   make browser-test   the built book in headless Chromium (builds it if absent)
#   make assignments    per chapter: student notebook, autograder zip, instructor README
#   make assignments-test   build the assignments and grade them with otter run
#   make figures        redraw the README's figure

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Chapters run in fast mode unless the caller says otherwise.
export GILIB_FAST_MODE ?= 1

CHROMIUM := /usr/bin/chromium
# apt-get needs root; elsewhere go through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: book test test-fast browser-test chromium assignments assignments-test figures bench bench-paper venv clean

venv: $(STAMP)

# torch is installed first and by exact version: pip then takes the CPU wheel
# instead of resolving a multi-GB CUDA build for a bare `torch` requirement.
# pip byte-compiles what it installs on one core (about a minute here); the
# packages are compiled once afterwards on every core instead. compileall's
# status is ignored: torch ships a file for Python 3.12 only, which fails to
# compile (pip skips it too) and is never imported.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

book: $(STAMP)
	# --all: re-execute every chapter even when only gilib changed.
	# On every core: gilib/book/build.py runs jupyter-book build with Sphinx -j.
	$(BIN)/python -m gilib.book.build . --all -W -n --keep-going
	# Record the executed chapters, so that the chapter tests read them
	# instead of executing every chapter a second time.
	$(BIN)/python -m gilib.book.executed stamp

# On every core (pytest-xdist): each test runs torch on one thread; the
# tests that start Ray share one worker, and each other chapter's tests stay
# on one worker (tests/conftest.py).
# The 20 slowest are printed: where CI's time goes.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadgroup --durations=20

# Every test not marked slow (tests/conftest.py says what is): for a
# contributor's edit-test loop; `make test` still runs the whole suite.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "not slow"

# The browser test of the built book (tests/book/test_browser.py): every page in
# headless Chromium, screenshots into _build/screenshots/. It tests the book
# as last built; `make book browser-test` rebuilds it first.
browser-test: $(STAMP) chromium _build/html/chapters/intro.html
	GILIB_BROWSER_TEST=1 $(BIN)/python -m pytest tests/book/test_browser.py

_build/html/chapters/intro.html:
	$(MAKE) book

# Debian's chromium, which the browser test drives through Playwright
# (no browser download).
chromium:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }
	@$(CHROMIUM) --version 2>/dev/null | grep -i chromium

# Graded assignments from the chapters' otter questions (gilib.book.assignments):
# per chapter a student notebook with its public tests, an autograder zip and
# an instructor README, in _build/assignments/. otter-grader is installed
# here only, so that `make book` and `make test` stay as light as they are.
ASSIGN_STAMP := $(VENV)/.assignments-installed

$(ASSIGN_STAMP): $(STAMP) requirements-assignments.txt
	$(BIN)/python -m pip install --quiet -r requirements-assignments.txt -c constraints.txt
	touch $(ASSIGN_STAMP)

assignments: $(ASSIGN_STAMP)
	$(BIN)/python -m gilib.book.assignments build --out _build/assignments

# Builds every assignment and grades a chapter's solution and student
# notebooks with `otter run` (tests/book/test_grading.py; skipped by `make test`).
assignments-test: $(ASSIGN_STAMP)
	GILIB_ASSIGNMENTS_TEST=1 $(BIN)/python -m pytest tests/book/test_grading.py

# The README's figure, drawn by gilib.book.plots.threat_model.
figures: $(STAMP)
	$(BIN)/python -m gilib.book.upkeep threat-model docs/threat_model.png

# Figures, never assertions. The comparison runs the reference's setting
# (500 steps, 500 starts) on five CoLA sentences. With REF=SCRATCH (the
# reference code built by ../shared/reference/setup.sh) the paper's own code
# runs beside our three fast paths, one core each, and the table gives the
# ratio measured in that run (about 45 minutes); without it, all our paths
# (the slow plain one too) on two cores.
REF ?=
bench: $(STAMP)
	$(BIN)/python bench/attack_speed.py
	$(BIN)/python bench/reference_comparison.py $(if $(REF),--reference $(REF) --paths fast fast-bf16 fast-short --out data/bench/reference_comparison.csv,--jobs 2)

# The paper's full setting (2000 steps): long-running, not part of make test.
bench-paper: $(STAMP)
	$(BIN)/python bench/reference_comparison.py --paper --jobs 2

clean:
	rm -rf _build
