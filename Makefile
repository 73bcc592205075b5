# The two set-up commands: `make demo` and `make test`. Each creates .venv and installs what it
# needs, so either is the only command a newcomer types on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint docs docs-serve bench bench-quick clean test-binaries prometheus-tools \
	system-deps airflow-schemas

# apt-get install $(1) (as root, else through sudo): server binaries the tests start privately,
# and Prometheus/promtool for the alert-rule and exporter tests; each only when missing.
apt_install = { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; $$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(1); }

# Binaries the test suite starts itself (binary:Debian package): network namespaces for the
# worker-host tests, private redis-server and RabbitMQ nodes for the restart tests.
SYSTEM_BINARIES := ip:iproute2 redis-server:redis-server rabbitmqctl:rabbitmq-server

# setuptools reports every editable install with an "Editable installation" notice (a warning
# of its InformationOnly kind, nothing to act on); it would be the only output of a quiet install.
PIP_EDITABLE := PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_EDITABLE) '.[dev,mysql]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PIP_EDITABLE) '.[dev,mysql,bench]'
	touch $@

demo: $(STAMP)
	$(BIN)/statesweep demo

# The harnesses in tests/standby.py and tests/mariadb_replica.py run their own initdb/pg_ctl/
# pg_basebackup and mariadbd/mariadb-install-db: install them when the machine lacks them.
test-binaries:
	@test -x "$$(pg_config --bindir 2>/dev/null)/pg_basebackup" || \
		ls /usr/lib/postgresql/*/bin/pg_basebackup >/dev/null 2>&1 || $(call apt_install,postgresql)
	@command -v mariadb-install-db >/dev/null 2>&1 || $(call apt_install,mariadb-server)

prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		$(call apt_install,prometheus)

system-deps:
	@missing=""; for pair in $(SYSTEM_BINARIES); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${pair%%:*}" >/dev/null 2>&1 \
	    || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing$$missing"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The suite's processes (pytest-xdist): most tests wait on services and workers, not the CPU,
# so more processes than cores; tests/conftest.py keeps the fault tests in one serial lane.
TEST_PROCESSES ?= 5

test: $(STAMP) system-deps test-binaries prometheus-tools
	$(BIN)/ruff check workers tests bench beat_schedule.py docs/gen_reference.py
	$(BIN)/mypy workers beat_schedule.py
	$(MKDOCS) build --strict
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup --durations=25

lint: $(STAMP)
	$(BIN)/ruff check workers tests bench beat_schedule.py docs/gen_reference.py
	$(BIN)/mypy workers beat_schedule.py

# The docs site (mkdocs.yml): README.md as its home page, the guides in docs/, and reference
# pages (settings, CLI, metrics) that docs/gen_reference.py generates from the code at build
# time. Built into .venv/site; --strict fails on a broken link or anchor.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs: $(STAMP)
	$(MKDOCS) build --strict

docs-serve: $(STAMP)
	$(MKDOCS) serve

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --rows 1000000

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --rows 100000 --quick

# Regenerate tests/airflow_schemas/ from real Airflows (each in a virtualenv of its own under
# /opt, never statesweep's): `airflow db migrate` on fresh PostgreSQL and MariaDB databases,
# dumped by the servers' tools. Not on `make test`'s path: the dumps are committed.
airflow-schemas: $(STAMP)
	@command -v pkg-config >/dev/null && test -e /usr/include/mysql/mysql.h || \
		$(call apt_install,default-libmysqlclient-dev pkg-config)
	$(BIN)/python -m tests.airflow_schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache statesweep.db*
