# The two commands of the README, plus helpers. Every target sets up what it needs itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: install run ui serve repro data test test-fast browser format clean image deploy

install: $(STAMP)

# requirements.lock pins every package (it is `pip freeze` of a working install), so pip resolves
# at once and a clean clone gets exactly the versions the tests ran with.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "imtext needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	@echo "installing imtext and its pinned dependencies into $(VENV) (about 2 minutes)"
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

# The built-in dataset is generated, not downloaded: the same seed gives the bytes data.dvc tracks.
data: install
	@if dvc status --quiet data.dvc 2>/dev/null; then \
		echo "data/shapes matches data.dvc; not regenerating"; \
	else \
		imtext data shapes --out data/shapes; \
	fi

# The whole Kubeflow pipeline on KFP's local runner: prepare -> pretrain -> finetune -> evaluate ->
# export -> register -> (gate) promote, MLflow in ./mlflow.db. `make repro` runs the DVC stages.
run: data
	imtext pipeline run --data data/shapes --out artifacts/kfp

# MLflow's UI on the store `make run` logged to (sqlite:///mlflow.db, ./mlartifacts), on
# 127.0.0.1:$(UI_PORT); it prints the address of the latest run. Ctrl-C stops it.
UI_PORT ?= 5000
ui: install
	imtext ui --port $(UI_PORT)

# The search service on the champion `make run` promoted (README "Serving"): the search page on
# http://127.0.0.1:$(SERVE_PORT), the gallery is the test split of data/shapes. Ctrl-C stops it.
SERVE_PORT ?= 8080
serve: data
	imtext serve --port $(SERVE_PORT)

repro: data
	dvc repro
	dvc status

# The suite runs in TEST_WORKERS processes (pytest-xdist, work stealing so the long pipeline tests
# spread out); each holds PyTorch and ONNX Runtime to one thread (tests/conftest.py). Three on two
# cores: many tests wait on subprocesses and servers, and two workers left a quarter of the CPU idle.
TEST_WORKERS ?= 3
# The tests' temporary files (pytest's tmp_path and TMPDIR: SQLite stores, DVC caches, KFP runs,
# checkpoints) go to a fresh directory in memory (/dev/shm) when it has TEST_SHM_GB free: every
# SQLite migration and checkpoint is fsync'ed, and a new MLflow store took 8.2 s on this disk
# against 1.4 s in memory. Passing tests' directories go at their teardown (tests/conftest.py); a
# failed run keeps the directory and names it.
TEST_SHM_GB ?= 6
test: install browser
	ruff check src tests bench components pipelines k8s
	ruff format --check src tests bench components pipelines k8s
	lint-imports
	@free=$$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $$4}'); \
	if [ "$${free:-0}" -ge $$(( $(TEST_SHM_GB) * 1048576 )) ]; then tmp=$$(mktemp -d /dev/shm/imtext-tests.XXXXXX); \
	else tmp=$$(mktemp -d); fi && mkdir "$$tmp/tmp" && echo "test files: $$tmp" && \
	if TMPDIR="$$tmp/tmp" pytest -n $(TEST_WORKERS) --dist worksteal --durations=15 \
		--basetemp="$$tmp/pytest"; then rm -rf "$$tmp"; \
	else status=$$?; echo "the failed tests' files are kept in $$tmp"; exit $$status; fi

# Chromium and its driver for the browser test (tests/browser): installed with apt-get when missing
# (as root, or through passwordless sudo). Where that fails the test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		echo "installing chromium and chromium-driver for the browser test"; \
		($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver) \
			|| echo "could not install Chromium; the browser test will be skipped"; \
	else \
		echo "no apt-get: the browser test is skipped unless chromium and chromedriver are on PATH"; \
	fi

test-fast: install
	pytest -n $(TEST_WORKERS) -m "not slow"

format: install
	ruff format src tests bench components pipelines k8s
	ruff check --fix src tests bench components pipelines k8s

# The container image: builds and pushes $IMTEXT_IMAGE (default ghcr.io/imtext/imtext:<version>).
# Needs docker buildx (or CONTAINER_ENGINE=podman); PUSH=0 builds only.
image:
	docker/build-push.sh

# The cluster side (k8s/README.md): refuse an overlay whose secrets are still the placeholders of
# k8s/base, then apply it. OVERLAY: your own overlay, which replaces them. For a throw-away
# kind/minikube cluster only: ALLOW_PLACEHOLDERS=1 (reports them, applies anyway).
OVERLAY ?= k8s/overlays/gpu
ALLOW_PLACEHOLDERS ?=
deploy:
	python3 k8s/check_secrets.py $(if $(ALLOW_PLACEHOLDERS),--allow-placeholders) $(OVERLAY)
	kubectl apply -k $(OVERLAY)

clean:
	rm -rf artifacts .pytest_cache
