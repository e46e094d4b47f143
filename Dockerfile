# syntax=docker/dockerfile:1.7
# Qwen-Image Runpod serverless worker.
#
# torch 2.13.0 from PyPI is built against CUDA 13.0 (it brings its own CUDA 13.0 and cuDNN 9 libraries as pip
# packages), so the host needs an NVIDIA driver >= 580. On Runpod, restrict the endpoint to CUDA 13.0+ machines.
#
# Build args (see README "Deploy"):
#   QWEN_IMAGE_MODEL        text-to-image repo id to bake and serve, or "none"        (default Qwen/Qwen-Image)
#   QWEN_IMAGE_EDIT_MODEL   edit repo id to bake and serve, or "none"                 (default none)
#   QWEN_IMAGE_REVISION / QWEN_IMAGE_EDIT_REVISION   revisions to bake               (default main)
#   BAKE_MODELS             "true" bakes the weights into the image; "false" leaves them to Runpod's cached
#                           models or a network volume                                (default true)
#   SAFETY_CHECKER_MODEL    the NSFW checker baked beside them, or "none"             (CompVis/stable-diffusion-safety-checker)
# An HF token, when a repo needs one, is passed as a build secret and never lands in a layer:
#   docker build --secret id=hf_token,env=HF_TOKEN .
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the pins change, not on every code edit.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# Weights live outside /runpod-volume: a network volume mounted there would hide anything baked at that path.
ENV HF_HOME=/models/huggingface
ARG QWEN_IMAGE_MODEL=Qwen/Qwen-Image
ARG QWEN_IMAGE_EDIT_MODEL=none
ARG QWEN_IMAGE_REVISION=main
ARG QWEN_IMAGE_EDIT_REVISION=main
ARG BAKE_MODELS=true
ARG SAFETY_CHECKER_MODEL=CompVis/stable-diffusion-safety-checker
COPY builder/fetch_models.py builder/
RUN --mount=type=secret,id=hf_token,required=false \
    set -eu; \
    models=""; \
    if [ "$QWEN_IMAGE_MODEL" != "none" ]; then models="t2i"; fi; \
    if [ "$QWEN_IMAGE_EDIT_MODEL" != "none" ]; then models="${models:+$models,}edit"; fi; \
    extra=""; \
    if [ "$BAKE_MODELS" != "true" ] || [ -z "$models" ]; then models="none"; fi; \
    if [ "$BAKE_MODELS" = "true" ] && [ "$SAFETY_CHECKER_MODEL" != "none" ]; then extra="--extra-repo $SAFETY_CHECKER_MODEL"; fi; \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
    python builder/fetch_models.py --models "$models" \
        --t2i-repo "$QWEN_IMAGE_MODEL" --revision-t2i "$QWEN_IMAGE_REVISION" \
        --edit-repo "$QWEN_IMAGE_EDIT_MODEL" --revision-edit "$QWEN_IMAGE_EDIT_REVISION" $extra; \
    chmod -R a+rX /models

# The worker's code, last: editing it rebuilds only these small layers.
COPY pyproject.toml handler.py test_input.json ./
COPY src/ src/
RUN pip install --no-deps . && chmod -R a+rX /app

ENV QWEN_IMAGE_MODEL=${QWEN_IMAGE_MODEL} \
    QWEN_IMAGE_EDIT_MODEL=${QWEN_IMAGE_EDIT_MODEL} \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_ENABLE_PARALLEL_LOADING=yes \
    RUNPOD_LOG_LEVEL=INFO \
    REQUIRE_CUDA=1 \
    AWS_EC2_METADATA_DISABLED=true

CMD ["python", "-u", "handler.py"]
