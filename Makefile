# Two commands on a fresh clone: `make demo` runs the main job, `make test` the whole suite (what CI runs);
# `make test-fast` leaves out the tests marked slow, for the edit-test loop (under a minute on two cores).
# Both create (or reuse) the virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit demo

# --dist loadfile: one worker runs a file's tests, so that the torchrun tests run one after another and the
# demo's and the study's runs, which their tests share, are made once (xdist 3.8's loadgroup ignored the groups)
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-fast: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=15

lint: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench
