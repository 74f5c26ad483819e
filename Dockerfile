# syntax=docker/dockerfile:1
# The one splitserve image: every pod (operator, router, prefill, decode) runs `splitserve ...`.
#   docker build -t ghcr.io/splitserve/splitserve:0.1.0 .
# The Linux torch wheels on PyPI carry CUDA; the CPU-only build works the same way on nodes
# without GPUs (engines then run in bfloat16 on the CPU).
#
# scripts/image-install.sh is the one list of install steps: the local test cluster builds its
# pods' environment with the same script (cluster/image.py), and reads this file's final stage
# (ENV, WORKDIR, USER, ENTRYPOINT, CMD) as the pods' runtime environment. Keep those instructions
# in the simple KEY=VALUE / JSON forms below, so both readers see the same facts.
# The image holds no model weights: pods load models from pvc:// volumes or a hub.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (they read only pyproject.toml), so source edits do not reinstall torch.
COPY scripts/image-install.sh /usr/local/bin/image-install.sh
COPY pyproject.toml setup.py README.md ./
RUN image-install.sh /opt/splitserve /src deps
# A compiler in the build stage only: the package step prebuilds the C++ CPU attention kernels
# into the venv, so the slim final image runs them without one.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY splitserve ./splitserve
COPY engine ./engine
COPY kvtransfer ./kvtransfer
COPY services ./services
COPY proto ./proto
COPY kernels ./kernels
COPY operator ./operator
RUN image-install.sh /opt/splitserve /src package

FROM python:${PYTHON_VERSION}-slim
# The non-root user the pods run as (the operator sets runAsUser 10001 to match).
RUN groupadd --gid 10001 splitserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/splitserve splitserve
COPY --from=build /opt/splitserve /opt/splitserve
# PYTHONSAFEPATH: the working directory never shadows the stdlib (the package has an
# `operator` folder). HOME and the caches are emptyDirs in the pods (read-only root filesystem).
# SPLITSERVE_CPU_KERNELS_JIT=0: engines load the prebuilt C++ kernels or fall back to torch, and
# never compile at start (the same in every cluster, whatever compiler a node has).
ENV PATH=/opt/splitserve/bin:$PATH \
    HOME=/home/splitserve \
    HF_HOME=/home/splitserve/.cache/huggingface \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPLITSERVE_CPU_KERNELS_JIT=0
WORKDIR /home/splitserve
USER 10001:10001
EXPOSE 8000 50051 9090
ENTRYPOINT ["splitserve"]
CMD ["--help"]
