# eventaudit: `make run` starts the whole stack with traffic; `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test unit lint format dashboards bench clean

setup:
	@bash tools/setup.sh

run: setup
	@$(PY) -m tools.run

test: setup
	@$(VENV)/bin/pytest

unit: setup
	@$(VENV)/bin/pytest tests/unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

dashboards: setup
	$(PY) -m dashboards.build

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
