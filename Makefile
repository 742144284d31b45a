# Two commands: `make run` (the pipeline) and `make test` (the test suite).
# Both create or refresh the virtual environment from pyproject.toml first.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imagegen-$(shell sha256sum pyproject.toml | cut -c1-16)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test venv dataset postgresql schedule schedule-status stack-up stack-status stack-down

run: venv dataset  ## dvc repro, then the wall time of each stage it ran and the total
	$(PY) bench/timed_repro.py

test: venv dataset postgresql
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)
	@# An editable install points at one checkout: re-point it when the venv is shared.
	@$(PY) -c "import imagegen, sys; sys.exit(not imagegen.__file__.startswith('$(CURDIR)/'))" 2>/dev/null \
		|| $(PY) -m pip install -q --no-deps -e .

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	rm -f $(VENV)/.imagegen-* && touch $@

# Scheduled retraining against a Prefect server (start one with `prefect server start --host 127.0.0.1`).
schedule schedule-status: export PREFECT_API_URL ?= http://127.0.0.1:4200/api

schedule: venv  ## register the weekly retrain deployment, then run its worker in the foreground
	$(PY) -m pipelines.deploy serve

schedule-status: venv  ## deployment, next runs, and whether a worker is polling (exit 1 if none)
	$(PY) -m pipelines.deploy status

# The offline data source: Debian's dataset-fashion-mnist (installed here when running as root).
dataset:
	@test -d /usr/share/datasets/fashion-mnist && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "note: /usr/share/datasets/fashion-mnist is missing; fetch will try the official URLs" \
		     "(offline: sudo apt-get install dataset-fashion-mnist)"; \
	fi

# The team stack on this machine (README "Team setup"): PostgreSQL, SeaweedFS S3, MLflow and Prefect
# servers, a worker, the DVC remote. State, logs and generated credentials in .stack/ (git-ignored).
stack-up: venv postgresql  ## start what is not running, wait for health, print the URLs and the env
	$(PY) -m pipelines.stack up

stack-status: venv  ## each service up/down, whether it requires auth, its URL; is a worker polling? (exit 1 when not all up)
	$(PY) -m pipelines.stack status

stack-down: venv  ## stop every service of the stack by PID; data kept
	$(PY) -m pipelines.stack down

# PostgreSQL from Debian's package (installed here when running as root).
postgresql:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else \
		echo "note: PostgreSQL is missing (sudo apt-get install postgresql): the team stack and its tests need it"; \
	fi
