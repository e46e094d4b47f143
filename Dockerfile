# syntax=docker/dockerfile:1.7
# Qwen-Image Runpod serverless worker.
#
# torch 2.13.0 from PyPI is built against CUDA 13.0 (it brings its own CUDA 13.0 and cuDNN 9 libraries as pip
# packages), so the host needs an NVIDIA driver >= 580. On Runpod, restrict the endpoint to CUDA 13.0+ machines.
#
# Build args (see README "Deploy"):
#   CUDA_IMAGE              the base image                                            (nvidia/cuda:13.0.2-base-ubuntu24.04)
#   PYTHON                  the base's Python package and command                    (python3.12, Ubuntu 24.04's)
#   QWEN_IMAGE_MODEL        text-to-image repo id to bake and serve, or "none"        (default Qwen/Qwen-Image)
#                           (Qwen/Qwen-Image-2512; Qwen/Qwen-Image-2.1 with the licence arg below)
#   QWEN_IMAGE_EDIT_MODEL   edit repo id to bake and serve, or "none"                 (default none)
#                           (Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509 or -2511)
#   QWEN_IMAGE_REVISION / QWEN_IMAGE_EDIT_REVISION   revisions to bake               (default main)
#   QWEN_IMAGE_LAYERED_MODEL     layers pipeline to bake and serve (Qwen/Qwen-Image-Layered), or "none" (default none)
#   QWEN_IMAGE_CONTROLNET_MODEL  ControlNet to bake and serve (InstantX/Qwen-Image-ControlNet-Union), or "none"
#   LIGHTNING_LORA, LIGHTNING_LORA_4STEP, LIGHTNING_EDIT_LORA, LIGHTNING_EDIT_LORA_4STEP
#                           a Lightning file to bake and serve, spelled org/name:file (builder/fetch_models.py --list
#                           prints each one), or empty                                (default empty: no fast mode)
#   QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE   "true" accepts the Qwen Research License: needed to bake Qwen-Image-2.1,
#                           and the image then serves it                               (default false)
#   BAKE_MODELS             "true" bakes the models above into the image; "false" leaves them to Runpod's cached
#                           models or a network volume (the image still names them)   (default true)
# With no build argument at all (what the Runpod Hub builds) the image bakes Qwen/Qwen-Image and the checker only.
#   SAFETY_CHECKER_MODEL    the NSFW checker, baked whatever BAKE_MODELS says (~1.2 GB), or "none": no checker,
#                           and the worker then defaults to SAFETY_CHECKER=off        (CompVis/stable-diffusion-safety-checker)
#   HF_ENDPOINT             a Hugging Face Hub mirror to bake from                    (unset: huggingface.co)
# An HF token, when a repo needs one, is passed as a build secret and never lands in a layer:
#   docker build --secret id=hf_token,env=HF_TOKEN .
#
# The base is CUDA's "base" flavour (the CUDA runtime library, forward-compatibility libs and the NVIDIA_* settings
# the container toolkit reads), not "runtime": runtime adds CUDA's math libraries (cuBLAS, cuFFT, cuSPARSE, NCCL,
# ...), which torch's wheels already bring as nvidia-* pip packages (~2.7 GB) and load from there, so a runtime
# base would only add GBs torch never loads. The driver itself (libcuda) is mounted by the container toolkit.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${CUDA_IMAGE}

# The base's Python: Ubuntu 24.04's python3.12 here; another base names its own (the stand-in test: python3.11).
ARG PYTHON=python3.12

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN apt-get update \
    && apt-get install -y --no-install-recommends "$PYTHON" "$PYTHON-venv" ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && "$PYTHON" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the pins change, not on every code edit. pip's download cache
# is a build cache mount, in no layer: with BuildKit a rebuild after a pin change re-downloads only what changed.
# (Debian 12's buildah 1.28, which `make image-test` uses, keeps nothing in it; there the layer cache does the work.)
COPY requirements.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r requirements.txt

# Weights live outside /runpod-volume: a network volume mounted there would hide anything baked at that path.
ENV HF_HOME=/models/huggingface
ARG QWEN_IMAGE_MODEL=Qwen/Qwen-Image
ARG QWEN_IMAGE_EDIT_MODEL=none
ARG QWEN_IMAGE_REVISION=main
ARG QWEN_IMAGE_EDIT_REVISION=main
ARG QWEN_IMAGE_LAYERED_MODEL=none
ARG QWEN_IMAGE_CONTROLNET_MODEL=none
ARG LIGHTNING_LORA=
ARG LIGHTNING_LORA_4STEP=
ARG LIGHTNING_EDIT_LORA=
ARG LIGHTNING_EDIT_LORA_4STEP=
ARG QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE=false
ARG BAKE_MODELS=true
ARG SAFETY_CHECKER_MODEL=CompVis/stable-diffusion-safety-checker
ARG HF_ENDPOINT=
COPY builder/fetch_models.py builder/
# The checker is baked even when the pipelines are not: a slim image must start with its defaults, and Runpod's
# cached-model field names one repo, the pipeline. /models exists whatever is baked (the chmod must not fail).
RUN --mount=type=secret,id=hf_token,required=false \
    set -eu; \
    models=""; \
    extra=""; \
    if [ "$BAKE_MODELS" = "true" ]; then \
        if [ "$QWEN_IMAGE_MODEL" != "none" ]; then models="t2i"; fi; \
        if [ "$QWEN_IMAGE_EDIT_MODEL" != "none" ]; then models="${models:+$models,}edit"; fi; \
        layered="${QWEN_IMAGE_LAYERED_MODEL:-none}"; \
        if [ "$layered" != "none" ]; then models="${models:+$models,}layered"; extra="--repo layered=$layered"; fi; \
        controlnet="${QWEN_IMAGE_CONTROLNET_MODEL:-none}"; \
        if [ "$controlnet" != "none" ]; then \
            models="${models:+$models,}controlnet-union"; extra="$extra --repo controlnet-union=$controlnet"; \
        fi; \
        for lora in "${LIGHTNING_LORA:-}" "${LIGHTNING_LORA_4STEP:-}" "${LIGHTNING_EDIT_LORA:-}" \
                    "${LIGHTNING_EDIT_LORA_4STEP:-}"; do \
            if [ -n "$lora" ] && [ "$lora" != "none" ]; then extra="$extra --file $lora"; fi; \
        done; \
    fi; \
    if [ "${QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE:-false}" = "true" ]; then extra="$extra --accept-research-license"; fi; \
    if [ "$SAFETY_CHECKER_MODEL" != "none" ]; then extra="$extra --extra-repo $SAFETY_CHECKER_MODEL"; fi; \
    if [ -z "${HF_ENDPOINT:-}" ]; then unset HF_ENDPOINT; fi; \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
    python builder/fetch_models.py --models "${models:-none}" \
        --t2i-repo "$QWEN_IMAGE_MODEL" --revision-t2i "$QWEN_IMAGE_REVISION" \
        --edit-repo "$QWEN_IMAGE_EDIT_MODEL" --revision-edit "$QWEN_IMAGE_EDIT_REVISION" $extra; \
    mkdir -p /models; \
    chmod -R a+rX /models

# The worker's code, last: editing it rebuilds only these small layers. The package is built outside /app, so no
# build/ or *.egg-info is left beside the code.
COPY pyproject.toml handler.py test_input.json ./
COPY src/ src/
RUN set -eu; \
    cp -r /app /tmp/qwen-worker-src; \
    pip install --no-cache-dir --no-deps /tmp/qwen-worker-src; \
    rm -rf /tmp/qwen-worker-src; \
    chmod -R a+rX /app

ENV QWEN_IMAGE_MODEL=${QWEN_IMAGE_MODEL} \
    QWEN_IMAGE_EDIT_MODEL=${QWEN_IMAGE_EDIT_MODEL} \
    QWEN_IMAGE_LAYERED_MODEL=${QWEN_IMAGE_LAYERED_MODEL} \
    QWEN_IMAGE_CONTROLNET_MODEL=${QWEN_IMAGE_CONTROLNET_MODEL} \
    LIGHTNING_LORA=${LIGHTNING_LORA} \
    LIGHTNING_LORA_4STEP=${LIGHTNING_LORA_4STEP} \
    LIGHTNING_EDIT_LORA=${LIGHTNING_EDIT_LORA} \
    LIGHTNING_EDIT_LORA_4STEP=${LIGHTNING_EDIT_LORA_4STEP} \
    QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE=${QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE} \
    SAFETY_CHECKER_MODEL=${SAFETY_CHECKER_MODEL} \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_ENABLE_PARALLEL_LOADING=yes \
    RUNPOD_LOG_LEVEL=INFO \
    REQUIRE_CUDA=1 \
    AWS_EC2_METADATA_DISABLED=true \
    PIP_NO_CACHE_DIR=1

# One image, two ways to serve, chosen at run time by SERVE: the queue worker (default), or with SERVE=http the HTTP
# server of a load-balancing endpoint (README "OpenAI Images API"), on PORT (80) with /ping on PORT_HEALTH (PORT).
# The queue worker listens on nothing; EXPOSE only documents the HTTP server's default port.
EXPOSE 80
CMD ["python", "-u", "handler.py"]
