# eventaudit: `make run` starts the whole stack with traffic; `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run stop test unit soak lint format dashboards bench clean

setup:
	@bash tools/setup.sh

run: setup
	@$(PY) -m tools.run

# Stops a stack that `make run` started in another terminal (or says nothing runs).
stop:
	@if [ -x $(PY) ]; then $(PY) -m tools.run --stop; else python3 -m tools.run --stop; fi

test: setup
	@$(VENV)/bin/pytest

unit: setup
	@$(VENV)/bin/pytest tests/unit

# The simulation (tests/sim) at length: 2,000 schedules of up to 80 steps, in memory.
soak: setup
	@HYPOTHESIS_PROFILE=soak $(VENV)/bin/pytest tests/sim --timeout=7200 --hypothesis-show-statistics

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

dashboards: setup
	$(PY) -m dashboards.build
	cp dashboards/eventaudit.json prometheus/alerts.yml prometheus/rules.yml charts/eventaudit/files/

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
