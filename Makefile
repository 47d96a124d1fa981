# kspill: two commands on a fresh machine -- `make demo` and `make test`.
# Each creates/updates .venv from uv.lock (pinned) before running.
SHELL := /bin/bash
PY      := .venv/bin/python
UV      := .tools/bin/uv
UV_VERSION := 0.13.8
export UV_PYTHON_DOWNLOADS := never
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := 1
export OMP_NUM_THREADS ?= 2
export OPENBLAS_NUM_THREADS ?= 2

.PHONY: setup demo test ui bench clean

$(UV):
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen
	@touch $@

setup: .venv/.synced

demo: setup
	$(PY) -m kspill_pipeline.cli demo

test: setup
	@bash scripts/ensure_chromium.sh
	$(PY) -m pytest $(PYTEST_ARGS)

ui: setup
	@mkdir -p .dagster
	@echo "Dagster UI on http://127.0.0.1:$${KSPILL_UI_PORT:-3000} (loopback only; data: $${KSPILL_DATA_DIR:-.kspill/data/demo}, instance: $${DAGSTER_HOME:-dagster.yaml -> .dagster/})"
	.venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $${KSPILL_UI_PORT:-3000}

bench: setup
	$(PY) -m kspill_pipeline.bench

clean:
	rm -rf .kspill/store .dagster
