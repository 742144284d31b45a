# Two commands: `make run` (the pipeline) and `make test` (the test suite).
# Both create or refresh the virtual environment from pyproject.toml (at the versions in constraints.txt) first.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imagegen-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test venv constraints dataset postgresql chromium schedule schedule-status stack-up stack-status stack-down

run: venv dataset  ## dvc repro, then the wall time of each stage it ran and the total
	$(PY) bench/timed_repro.py

# Values pinned in the repository must hold on every CPU, not only the one they were recorded on: after the
# whole suite, the unit tests run again with torch's kernels (ATen, MKL, oneDNN) held to AVX2 and to plain
# C++, as on CPUs without AVX-512 or AVX2. A pin that depends on the kernels fails here, not on a user's machine.
LOWER_CPUS := "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2" \
              "ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41"

test: venv dataset postgresql chromium  ## the whole suite (PYTEST_ARGS="..." runs a selection, no CPU re-runs)
	$(PY) -m pytest $(PYTEST_ARGS)
ifeq ($(PYTEST_ARGS),)
	@for cpu in $(LOWER_CPUS); do \
		echo "== tests/unit again with $$cpu"; \
		env $$cpu $(PY) -m pytest -q -p no:cacheprovider tests/unit || exit 1; \
	done
endif

venv: $(STAMP)
	@# An editable install points at one checkout: re-point it when the venv is shared.
	@$(PY) -c "import imagegen, sys; sys.exit(not imagegen.__file__.startswith('$(CURDIR)/'))" 2>/dev/null \
		|| $(PY) -m pip install -q --no-deps -e .

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.imagegen-* && touch $@

constraints:  ## resolve pyproject.toml afresh in a scratch venv and rewrite constraints.txt (then `make venv`)
	rm -rf .venv-resolve && python3 -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install -q --upgrade pip
	.venv-resolve/bin/python -m pip install -q -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .venv-resolve/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-resolve

# Scheduled retraining against a Prefect server (start one with `prefect server start --host 127.0.0.1`).
schedule schedule-status: export PREFECT_API_URL ?= http://127.0.0.1:4200/api

schedule: venv  ## register the weekly retrain deployment, then run its worker in the foreground
	$(PY) -m pipelines.deploy serve

schedule-status: venv  ## deployment, next runs, and whether a worker is polling (exit 1 if none)
	$(PY) -m pipelines.deploy status

# Debian packages, installed when running as root and missing; otherwise a note naming the command.
# dataset-fashion-mnist: the offline data source; postgresql: the team stack and its tests (run as the
# postgres user); chromium: the browser tests (Playwright drives it; no browser download).
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
define need_debian  # $(1): true when present, $(2): the package, $(3): what happens without it
	@$(1) && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && $(APT_INSTALL) $(2); \
	else \
		echo "note: Debian's $(2) is missing ($(3)): sudo apt-get install $(2)"; \
	fi
endef

dataset:
	$(call need_debian,test -d /usr/share/datasets/fashion-mnist,dataset-fashion-mnist,fetch will try the official URLs instead)

postgresql:
	$(call need_debian,ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1,postgresql,the team stack and its tests are skipped)

chromium:
	$(call need_debian,command -v chromium >/dev/null,chromium,the browser tests are skipped)

# The team stack on this machine (docs/team.md): PostgreSQL, SeaweedFS S3, MLflow and Prefect
# servers, a worker, the DVC remote. State, logs and generated credentials in .stack/ (git-ignored).
stack-up: venv postgresql  ## start what is not running, wait for health, print the URLs and the env
	$(PY) -m pipelines.stack up

stack-status: venv  ## each service up/down, whether it requires auth, its URL; is a worker polling? (exit 1 when not all up)
	$(PY) -m pipelines.stack status

stack-down: venv  ## stop every service of the stack by PID; data kept
	$(PY) -m pipelines.stack down
