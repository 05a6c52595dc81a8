# syntax=docker/dockerfile:1
# The one kdray image: Ray head and workers, KubeRay submitter Jobs, the Prefect server and worker,
# and Prefect flow runs all use it (k8s/). Build from the repository root:
#
#   docker build -t kdray:latest .
#   docker build -t kdray:cuda --build-arg TORCH_INDEX=<URL of PyTorch's wheel index for your CUDA> .
#
# TORCH_INDEX is the only place a package index is chosen; leave it empty for the default index, or
# pass PyTorch's CPU-only index for a small CPU image (see docs/kubernetes.md). Every other package
# is pinned by constraints.txt.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch, kdray and its pinned dependencies -------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""
ARG KDRAY_EXTRAS=k8s
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
# torch first and alone: the biggest layer, rebuilt only when its version or index changes.
RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
WORKDIR /src
COPY . .
# constraints.txt pins torch==2.13.0 too (without a local "+cpu"/"+cuXXX" label), so the torch
# installed above satisfies it and is kept.
RUN pip install -c constraints.txt ".[${KDRAY_EXTRAS}]" \
 && python -c "import kdray, ray, torch; print('kdray', kdray.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# ---- runtime ----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# wget: KubeRay's default health probes run `wget ... | grep success` inside Ray containers.
# dataset-fashion-mnist: the IDX files under /usr/share/datasets/fashion-mnist (no download at run time).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
# The profile.d line: login shells (`bash -l`, used by some KubeRay versions) rebuild PATH.
RUN groupadd --gid 1000 kdray \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/kdray --shell /bin/bash kdray \
 && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/kdray-venv.sh
COPY --from=build /opt/venv /opt/venv
# Source tree for Prefect flow runs (flows/, prefect.yaml, examples): deployments pull from here.
COPY --from=build /src /opt/kdray
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
# Non-root (uid 1000), matching runAsUser in k8s/ and kdray.k8s.
USER 1000:1000
WORKDIR /home/kdray
# No ENTRYPOINT: KubeRay supplies `ray start ...`, the submitter `ray job submit ...`, Prefect its
# own commands; `docker run kdray:latest` alone prints the CLI help.
CMD ["kdray", "--help"]
