# syntax=docker/dockerfile:1
# The one splitserve image: every pod (operator, router, prefill, decode) runs `splitserve ...`.
#   docker build -t ghcr.io/splitserve/splitserve:0.1.0 .
# The Linux torch wheels on PyPI carry CUDA; the CPU-only build works the same way on nodes
# without GPUs (engines then run in bfloat16 on the CPU).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/splitserve
WORKDIR /src
# Dependencies first, so source edits do not reinstall torch.
COPY pyproject.toml setup.py README.md ./
RUN /opt/splitserve/bin/pip install "torch==2.13.0"
COPY splitserve ./splitserve
COPY services ./services
COPY proto ./proto
COPY kernels ./kernels
COPY operator ./operator
# Extras: triton (GPU kernels) and nixl (KV transfer); a plain wheel install, not editable.
RUN /opt/splitserve/bin/pip install ".[triton,nixl]"

FROM python:${PYTHON_VERSION}-slim
# The non-root user the pods run as (the operator sets runAsUser 10001 to match).
RUN groupadd --gid 10001 splitserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/splitserve splitserve
COPY --from=build /opt/splitserve /opt/splitserve
# PYTHONSAFEPATH: the working directory never shadows the stdlib (the package has an
# `operator` folder). HOME and the caches are emptyDirs in the pods (read-only root filesystem).
ENV PATH=/opt/splitserve/bin:$PATH \
    HOME=/home/splitserve \
    HF_HOME=/home/splitserve/.cache/huggingface \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/splitserve
USER 10001:10001
EXPOSE 8000 50051 9090
ENTRYPOINT ["splitserve"]
CMD ["--help"]
