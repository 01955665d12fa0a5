# The README's quick start. Each target sets up its own virtualenv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint unit integration bench run clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/invoice-mailer demo

# The whole suite: lint, types, unit and integration tests (real RabbitMQ, worker processes).
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

unit: $(VENV)/.installed
	$(BIN)/pytest tests/unit

integration: $(VENV)/.installed
	$(BIN)/pytest tests/integration

# The Procfile (worker + Flower); bin/in-venv finds .venv, no activation needed.
run: $(VENV)/.installed
	$(BIN)/honcho start $(RUN_ARGS)

# invoice-mailer against the minimal baseline (needs RabbitMQ); see README "Performance".
bench: $(VENV)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis var
