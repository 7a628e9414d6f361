# Every target installs what it needs first, so `make test` or `make demo` can be the first command typed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.installed
MLFLOW_URI ?= sqlite:///mlflow.db
ARGS ?=

.PHONY: install postgres services services-stop test lint format demo pretrain-tiny sweep ablate-decoupler ablate-fusion ablate-loss ui dashboard clean-outputs

install: $(STAMP)

# torch + torchvision come from the registry (the CUDA build runs on CPU; no CPU torchvision exists), pinned
# with everything else in requirements.lock; sam2 is an sdist built without CUDA and without build isolation
# (isolation would pull a second torch into the build env). Bytecode is compiled once here: uv does not by
# default, and where PYTHONDONTWRITEBYTECODE is set every process would compile its imports again (~11 s a
# process on 2 cores).
$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.13.8
	$(UV) pip sync --python $(BIN)/python --compile-bytecode requirements.lock
	SAM2_BUILD_CUDA=0 $(UV) pip install --python $(BIN)/python --no-build-isolation --no-deps sam2==1.1.0
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# PostgreSQL from Debian's packages (shared sweeps, the MLflow server's store; the tests start their own).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ( $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql )

# A team's PostgreSQL and MLflow tracking server on this machine, on 127.0.0.1 (docs/scale.md).
SERVICES_DIR ?= .services
services: install postgres
	$(BIN)/desa2va services start --folder $(SERVICES_DIR)

services-stop: install
	$(BIN)/desa2va services stop --folder $(SERVICES_DIR)

test: install postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install
	$(BIN)/desa2va demo $(ARGS)

# Train the tiny SAM-2 and VLM foundations from scratch (their own recipes) and compare their metrics with
# the shipped manifest; OUT=lightning_desa2va/weights/tiny replaces the shipped files.
OUT ?= outputs/foundations/tiny
pretrain-tiny: install
	$(BIN)/desa2va pretrain-tiny --out $(OUT) $(ARGS)

# An Optuna study over the pipeline (run again to resume it); WORKERS processes share its storage.
SWEEP ?= sweeps/decoupler_fusion.yaml
WORKERS ?= 1
sweep: install
	$(BIN)/desa2va sweep $(SWEEP) --workers $(WORKERS) $(ARGS)

# Ablations: grid studies printing mean ± std, 95% intervals and paired differences on test per variant, the Sa2VA
# control a row (sweeps/ablate_*.yaml); ABLATE_PROFILE=quick runs the short version.
ABLATE_PROFILE ?= default
ablate-decoupler ablate-fusion ablate-loss: ablate-%: install
	$(BIN)/desa2va sweep sweeps/ablate_$*.yaml --profile $(ABLATE_PROFILE) --workers $(WORKERS) $(ARGS)

# MLflow's UI on 127.0.0.1:5000; first prints each study's comparison URL (its trial runs, sorted, J&F columns).
ui: install
	$(BIN)/desa2va ui --backend-store-uri $(MLFLOW_URI) --port 5000

# optuna-dashboard on 127.0.0.1:8080 on the storage of SWEEP's study (PROFILE=quick for a quick run's study).
PROFILE ?= default
dashboard: install
	$(BIN)/desa2va dashboard $(SWEEP) --profile $(PROFILE)

clean-outputs:
	rm -rf outputs mlruns mlflow.db mlflow.db.lock
