# syntax=docker/dockerfile:1
#
# One image for both roles of strokes; the command picks the role:
#   docker run ... strokes:latest api --host 0.0.0.0 --port 8000           (the default CMD)
#   docker run --gpus ... -v /models/BAGEL-7B-MoT:/models/BAGEL-7B-MoT:ro strokes:latest \
#       worker --checkpoint /models/BAGEL-7B-MoT --device cuda:0 --metrics-port 9100
# The BAGEL-7B-MoT checkpoint (~30 GB) is never baked in: it is mounted read-only at run time.
# deploy/README.md explains compose and Kubernetes.

# CUDA 12.8 base: its driver requirement (R570+, or older datacenter drivers through CUDA's
# forward compatibility) is met by most H100/A100 hosts, while torch's default PyPI build needs
# CUDA 13 and a R580+ driver. The `base` flavour, not `runtime`: torch's wheels bring their own
# cuBLAS/cuDNN/NCCL as pip packages, so the runtime flavour's copies (~2 GB) would be dead weight;
# `base` keeps cudart and the NVIDIA_REQUIRE_CUDA label that makes the container toolkit reject
# a too-old driver with a clear message instead of a CUDA error deep inside torch.
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04


# ---- build: a virtual environment with torch (CUDA build) and the project ---------------------
FROM ${CUDA_BASE} AS build

# The tested torch release, built for CUDA 12.8 (the PyTorch index serves the matching
# nvidia-* libraries). For a CUDA 13 host: --build-arg TORCH_INDEX_URL=https://pypi.org/simple
# together with a CUDA 13 CUDA_BASE.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's own Python 3.12; apt packages are not version-pinned on purpose: Ubuntu removes old
# patch versions from its archive, so a pin would break the build within weeks.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Every other dependency at the exact version the test suite ran with (deploy/docker/lock.py
# writes the file), installed before the source is copied so code edits keep this layer cached.
COPY deploy/docker/requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt

# README.md stays out on purpose: setuptools only warns without it, and doc edits then do not
# rebuild this layer.
COPY clients/python /src/clients/python
COPY pyproject.toml /src/
COPY model /src/model
COPY service /src/service
# --no-deps: everything is already installed at its pinned version; `pip check` then fails the
# build if pyproject.toml gained a dependency that the lock file lacks. The package is `strokes`
# (the folders model/ and service/ are strokes.model and strokes.service); the client that
# `strokes demo` uses is its own distribution, installed from the same checkout.
RUN pip install --no-deps /src/clients/python /src \
 && pip check


# ---- runtime: the venv on a clean base, a non-root user, tini as PID 1 -------------------------
FROM ${CUDA_BASE} AS runtime

# python3.12: the venv's interpreter is a symlink to it. tini: reaps zombies (torch compile
# workers) and forwards SIGTERM, so the worker can hand its job back on shutdown.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 strokes \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin strokes \
 && install -d -o 10001 -g 10001 /data/blobs  # the local blob store's mount point: a fresh named volume copies this owner

COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/strokes-healthcheck

# Caches (Triton kernels, TorchInductor) under one folder, so a read-only root filesystem needs
# only this folder and /tmp writable (deploy/k8s mounts emptyDirs there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/strokes \
    XDG_CACHE_HOME=/home/strokes/.cache \
    TRITON_CACHE_DIR=/home/strokes/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/strokes/.cache/torchinductor

# Numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/strokes

# 8000: the API (HTTP, SSE and /metrics). 9100: a worker's /metrics.
EXPOSE 8000 9100

# Works for both roles: the script asks the API's /healthz on 8000 and, failing that, the
# worker's /metrics on 9100 (set STROKES_HEALTHCHECK_URL when the ports differ). The long start
# period covers a worker loading 30 GB of weights from a slow disk.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["strokes-healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--", "strokes"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
