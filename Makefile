# The two set-up commands: `make demo` and `make test`. Each creates .venv and installs what it
# needs, so either is the only command a newcomer types on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint bench bench-quick clean prometheus-tools

# Prometheus and promtool (Debian's `prometheus` package) for the alert-rule and exporter
# tests; installed only when missing. apt-get needs root: SUDO=sudo for a normal user.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,mysql]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,mysql,bench]'
	touch $@

demo: $(STAMP)
	$(BIN)/statesweep demo

prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		{ $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y \
		  --no-install-recommends prometheus; }

test: $(STAMP) prometheus-tools
	$(BIN)/ruff check workers tests bench beat_schedule.py
	$(BIN)/mypy workers beat_schedule.py
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check workers tests bench beat_schedule.py
	$(BIN)/mypy workers beat_schedule.py

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --rows 1000000

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --rows 100000 --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache statesweep.db*
