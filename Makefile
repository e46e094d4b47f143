# The two commands the README promises: `make demo` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := models/tiny

.PHONY: venv models demo test lint bench bench-lora clean s3-server image-corpus

# Re-install only when the pins change.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -r requirements-dev.txt
	$(PY) -m pip install -qq --no-deps -e .
	touch $@

venv: $(VENV)/.installed

$(MODELS)/.built: $(VENV)/.installed builder/tiny_models.py
	HF_HUB_OFFLINE=1 $(PY) builder/tiny_models.py $(MODELS)
	touch $@

models: $(MODELS)/.built

# Text-to-image on test_input.json with the tiny random-weight pipeline, in runpod's local test mode.
demo: $(MODELS)/.built
	HF_HUB_OFFLINE=1 QWEN_IMAGE_MODEL=$(MODELS)/qwen-image QWEN_IMAGE_EDIT_MODEL=$(MODELS)/qwen-image-edit \
		SAFETY_CHECKER_MODEL=$(MODELS)/safety-checker \
		DEFAULT_STEPS=2 LOCAL_OUTPUT_DIR=outputs $(PY) handler.py
	@echo "demo image(s) in outputs/:"; ls -1t outputs | head -n 3

# The S3 tests need a local Swift server from Debian's packages; installing it needs root. Without it they skip
# loudly (and fail under REQUIRE_S3_TESTS=1, as .ci/run sets).
s3-server:
	@bash scripts/install_s3_server.sh || echo "WARNING: local S3 server not installed; S3 tests will skip"

# Pillow's own test images (over a thousand broken, hostile and exotic files) for tests/test_image_corpus.py, fetched
# once from its sdist on PyPI into ~/.cache. Without them that test skips loudly (and fails under CI=true).
image-corpus: $(VENV)/.installed
	@$(PY) scripts/fetch_image_corpus.py || echo "WARNING: image corpus not fetched; tests/test_image_corpus.py will skip"

test: $(VENV)/.installed s3-server image-corpus
	$(PY) -m pytest

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade, simplify) over everything, mypy --strict over src/ and handler.py.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Everything around the model for a 1 MP result (validate, encode, upload to a local S3 server it starts itself,
# respond) beside a naive baseline, then an encoder-settings sweep. A benchmark, not a test: see docs/PERFORMANCE.md.
bench: $(VENV)/.installed s3-server
	$(PY) bench/worker_overhead.py $(BENCH_ARGS)

# What a fast job and a user-LoRA job cost per job before denoising, today's per-job load beside the new path, on
# a real-width transformer cut to a few blocks (CPU, ~2 min). A benchmark, not a test: see docs/PERFORMANCE.md.
bench-lora: $(VENV)/.installed
	$(PY) bench/lora_overhead.py $(BENCH_ARGS)

# The soak (tests/test_soak.py): 300+ mixed jobs through one worker, every response checked and RSS growth bounded.
# A few minutes on 2 cores, so `make test` leaves it out (pyproject's -m "not soak").
.PHONY: soak
soak: $(VENV)/.installed s3-server
	$(PY) -m pytest -m soak -s

clean:
	rm -rf $(VENV) models outputs .pytest_cache
