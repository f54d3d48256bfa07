# `make run`: set up .venv when missing, then run the whole pipeline (dvc repro) on params.yaml (digits).
# `make test`: set up .venv when missing, then run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned to the releases on this machine's disk (pip's local wheel cache)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# dvc repro reruns only the stages whose code, params or inputs changed; the table is the report's
# (its stage runs `tddyun report --quiet`, so the table is printed once, here, also when DVC skips it).
run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@cat artifacts/report/summary.md

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean:
	rm -rf artifacts .pytest_cache
