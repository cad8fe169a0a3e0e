# syntax=docker/dockerfile:1
# One image for every TurboServe service; the command picks the service (`turboserve gateway`, ...).
#
#   CPU (default, laptops):  docker build -t turboserve:cpu .
#   GPU:                     docker build -t turboserve:gpu --build-arg TORCH_VARIANT=cu130 --build-arg EXTRAS=gpu,k8s .
#
# torch is installed first, alone, from the PyTorch index of the chosen variant, so `pip install .` finds the
# pin satisfied and never pulls PyPI's default (CUDA) wheel into a CPU image. That layer is the big one and
# changes only with the build args.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA build on the PyTorch index (cu128, cu130, ...; the host driver must support it). Or pass
# TORCH_INDEX_URL=https://pypi.org/simple directly: PyPI's Linux x86_64 torch wheel is itself a CUDA build.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# pyproject extras: k8s (the scheduler's Kubernetes provisioner) always; add gpu (triton) for GPU images.
ARG EXTRAS=k8s

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app

# Dependencies in their own layer: resolve them against a stub package so editing services/ does not
# reinstall them. README.md is the project's readme (pyproject reads it at build time).
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p services && touch services/__init__.py \
    && pip install ".[${EXTRAS}]" \
    && pip uninstall -y turboserve \
    && rm -rf services build ./*.egg-info

COPY services ./services
RUN pip install --no-deps --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && python -c "import torch, services; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Synthetic tiny weights in the published layouts (no download), so a CPU image serves out of the box; a GPU
# deployment mounts the published files over TURBOSERVE_MODEL_DIR instead (README: which files go where).
RUN turboserve model synth --config tiny /opt/turboserve/models/tiny
ENV TURBOSERVE_MODEL_DIR=/opt/turboserve/models/tiny

# Unprivileged user; a writable home for torch/triton caches and a data dir for the state_store's
# directory backend.
RUN useradd --create-home --uid 10001 turboserve \
    && mkdir -p /var/lib/turboserve && chown turboserve:turboserve /var/lib/turboserve
USER turboserve
WORKDIR /home/turboserve

# 8080 gateway (WebSocket + viewer), 9100 Prometheus /metrics, 29500 worker migration rendezvous (TCPStore).
EXPOSE 8080 9100 29500

ENTRYPOINT ["turboserve"]
CMD ["--help"]
