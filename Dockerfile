# syntax=docker/dockerfile:1
# One image for every meshserve process; the sub-command picks it:
#   docker run IMAGE router | placement | runtime      (configured by MESH_* variables)
#
# CPU / default:  docker build -t meshserve:0.1.0 .
# CUDA variant:   docker build -t meshserve:0.1.0-cuda \
#                   --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 .
# The CUDA base has no Python of its own; the step below installs the distribution's python3
# (3.12 on Ubuntu 24.04) with apt. onnxruntime-gpu (CUDA 12 + cuDNN 9) is already the Linux
# x86-64 dependency in pyproject.toml, so both variants install the same Python packages; on a
# node without a GPU it runs on the CPU provider.
#
# BASE is pinned by tag. Pin it by digest too (python:3.11-slim@sha256:...) in your build
# pipeline: the digest could not be fetched where this file was written (no registry access).
ARG BASE=python:3.11-slim

FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Both bases share this step: python:*-slim already has python3 + venv, so it is skipped there.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first so that a code change does not reinstall onnxruntime.
COPY pyproject.toml README.md ./
RUN mkdir -p mesh router placement puller && touch mesh/__init__.py router/__init__.py \
      placement/__init__.py puller/__init__.py \
    && pip install . && pip uninstall -y meshserve
COPY mesh ./mesh
COPY router ./router
COPY placement ./placement
COPY puller ./puller
RUN pip install --no-deps . && mesh --help >/dev/null

FROM ${BASE} AS final
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 mesh \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/mesh --create-home \
         --shell /usr/sbin/nologin mesh
COPY --from=builder /opt/venv /opt/venv
# The chart mounts writable volumes on /tmp and the cache dir; the root filesystem stays read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mesh \
    MESH_RUNTIME_CACHE_DIR=/var/cache/meshserve
RUN mkdir -p /var/cache/meshserve && chown 10001:10001 /var/cache/meshserve
USER 10001:10001
WORKDIR /home/mesh
# 8033 router gRPC, 8034 placement gRPC, 8035 runtime gRPC, 9090 metrics (when MESH_*_METRICS_PORT=9090)
EXPOSE 8033 8034 8035 9090
ENTRYPOINT ["mesh"]
CMD ["router"]
