# One command sets up and runs the main job (`make repro`); one runs the tests (`make test`).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tlvit-installed
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup repro test test-fast slurm-up slurm-down mlflow-ui clean-runs

setup: $(STAMP)  ## create .venv and install tlvit with the exact versions CI uses

$(STAMP): pyproject.toml requirements-lock.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements-lock.txt -e '.[dev]'
	# AutoAttack (TL-Align Table 6): torchattacks pins requests~=2.25.1, which mlflow and dvc cannot use; it never
	# imports requests, so it goes in without its dependencies (torch, torchvision, scipy, tqdm are above)
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

repro: setup  ## dvc repro on the preset in params.yaml (default: embedded), then print where the report is
	dvc repro
	@$(BIN)/python -c "import yaml; print('Report: $(CURDIR)/reports/%s/README.md' % yaml.safe_load(open('params.yaml'))['preset'])"

test: setup  ## every test, including an end-to-end `dvc repro` of the smoke preset in a temporary repo
	$(BIN)/python -m pytest

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -m "not e2e and not slurm"

mlflow-ui: setup  ## browse the runs: http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

slurm-up:  ## start the single-node Slurm the cluster tests use (root; installs munge/slurm/mariadb with apt)
	bash scripts/slurm-up.sh

slurm-down:  ## stop it (`make slurm-down ARGS=--purge` also deletes its state)
	bash scripts/slurm-down.sh $(ARGS)

.PHONY: bench
bench: setup  ## speed benchmarks with their targets (docs/benchmarks.md); JSON in bench-results/; ARGS="step --quick" etc.
	$(BIN)/tlvit bench $(or $(ARGS),all) --out bench-results
