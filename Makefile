# The two commands the README promises: `make demo` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := models/tiny

.PHONY: help venv models demo check test test-fast lint bench bench-lora bench-step clean s3-server image-corpus image-test schema env-table

# Each target's `## ` comment is its line in `make help`.
help: ## List the targets, one line each
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-13s %s\n", $$1, $$2}'

# Re-install only when the pins change.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -r requirements-dev.txt
	$(PY) -m pip install -qq --no-deps -e .
	touch $@

venv: $(VENV)/.installed ## Create .venv with the pinned requirements (again only when the pins change)

$(MODELS)/.built: $(VENV)/.installed builder/tiny_models.py
	HF_HUB_OFFLINE=1 $(PY) builder/tiny_models.py $(MODELS)
	touch $@

models: $(MODELS)/.built ## Build the tiny random-weight pipelines into models/tiny

# Text-to-image on test_input.json with the tiny random-weight pipeline, in runpod's local test mode.
demo: $(MODELS)/.built ## Text-to-image on test_input.json with the tiny pipelines; image in outputs/
	HF_HUB_OFFLINE=1 QWEN_IMAGE_MODEL=$(MODELS)/qwen-image QWEN_IMAGE_EDIT_MODEL=$(MODELS)/qwen-image-edit \
		SAFETY_CHECKER_MODEL=$(MODELS)/safety-checker \
		DEFAULT_STEPS=2 LOCAL_OUTPUT_DIR=outputs $(PY) handler.py
	@echo "demo image(s) in outputs/:"; ls -1t outputs | head -n 3

# The deploy check (README, "Memory plan"): what the worker would load with this environment, from where, each
# component's size and whether it fits the GPU present, or GPU_MEMORY GB; loads no weights. Exit 0: it would start.
check: $(VENV)/.installed ## Would the worker start here, and fit the GPU (or GPU_MEMORY=80 GB)? Loads no weights
	HF_HUB_OFFLINE=1 $(PY) handler.py --check $(if $(GPU_MEMORY),--gpu-memory $(GPU_MEMORY))

# The S3 tests need a local Swift server from Debian's packages; installing it needs root. Without it they skip
# loudly (and fail under REQUIRE_S3_TESTS=1, as .ci/run sets).
s3-server: ## Install the local Swift S3 server the S3 tests use (needs root; warns otherwise)
	@bash scripts/install_s3_server.sh || echo "WARNING: local S3 server not installed; S3 tests will skip"

# Pillow's own test images (over a thousand broken, hostile and exotic files) for tests/test_image_corpus.py, fetched
# once from its sdist on PyPI into ~/.cache. Without them that test skips loudly (and fails under CI=true).
image-corpus: $(VENV)/.installed ## Fetch Pillow's corpus of broken and exotic images (once, into ~/.cache)
	@$(PY) scripts/fetch_image_corpus.py || echo "WARNING: image corpus not fetched; tests/test_image_corpus.py will skip"

# The README's env table is rendered from config.py's one table of settings; tests/test_docs.py fails while they differ.
env-table: $(VENV)/.installed ## Rewrite the README's "Environment variables" table from src/qwen_worker/config.py
	$(PY) scripts/env_table.py --write

test: $(VENV)/.installed s3-server image-corpus ## Every test but the soak
	$(PY) -m pytest

# The quick loop: no worker processes (the e2e marker, tests/conftest.py), so no S3 server to install either.
test-fast: $(VENV)/.installed ## The quick loop: pytest -m "not e2e" (in-process tests only, no worker process)
	$(PY) -m pytest -m "not e2e"

# The published JSON Schemas of the request and the result, from src/qwen_worker/contract.py (tests/test_contract.py
# fails when the committed files are stale).
schema: $(VENV)/.installed ## Regenerate schema/request.schema.json and schema/result.schema.json
	$(PY) scripts/gen_schema.py

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade, simplify) everywhere; mypy --strict over src/ and handler.py.
lint: $(VENV)/.installed ## ruff and mypy --strict, as CI runs them before the tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Everything around the model for a 1 MP result (validate, encode, upload to a local S3 server it starts itself,
# respond) beside a naive baseline, then an encoder-settings sweep. A benchmark, not a test: see docs/PERFORMANCE.md.
bench: $(VENV)/.installed s3-server ## CPU benchmark of everything around the model (docs/PERFORMANCE.md)
	$(PY) bench/worker_overhead.py $(BENCH_ARGS)

# What a fast job and a user-LoRA job cost per job before denoising, today's per-job load beside the new path, on
# a real-width transformer cut to a few blocks (CPU, ~2 min). A benchmark, not a test: see docs/PERFORMANCE.md.
bench-lora: $(VENV)/.installed ## CPU benchmark of the per-job cost of fast and LoRA jobs (docs/PERFORMANCE.md)
	$(PY) bench/lora_overhead.py $(BENCH_ARGS)

# Per mode, what a denoising step costs the host (syncs, dispatches per forward, once per call), the worker's job beside
# stock diffusers' call, on a real-width transformer cut to one block (CPU, minutes). See docs/PERFORMANCE.md.
bench-step: $(MODELS)/.built ## CPU count of host syncs and dispatches per step, every mode, worker vs diffusers
	$(PY) bench/step_bench.py $(BENCH_ARGS)

# The soak (tests/test_soak.py): 300+ mixed jobs through one worker, every response checked and RSS growth bounded.
# A few minutes on 2 cores, so `make test` leaves it out (pyproject's -m "not soak").
.PHONY: soak
soak: $(VENV)/.installed s3-server ## 300+ mixed jobs through one worker with an RSS bound (minutes)
	$(PY) -m pytest -m soak -s

# Build the Dockerfile for real with buildah against a debootstrap stand-in for nvidia/cuda, and serve from the images
# with no network (scripts/image_test.py); its Hub stage builds with no build args, as the Runpod Hub does, and runs
# .runpod/tests.json and each hub.json preset in that image. Needs root; skips loudly without it (fails under CI=true
# or REQUIRE_IMAGE_TEST=1). Its store stays in /var/cache/qwen-worker-image-test: cold ~13 min, warm ~6 min (measured).
image-test: $(MODELS)/.built ## Build the image (and the Runpod Hub's) with buildah on a stand-in base; serve offline
	$(PY) scripts/image_test.py

clean: ## Remove .venv, models, outputs and pytest's cache
	rm -rf $(VENV) models outputs .pytest_cache
