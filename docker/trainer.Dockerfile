# syntax=docker/dockerfile:1
# FineTune trainer image: PyTorch + the YOLOv5 trainer (the `trainer` extra), never kopf.
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t finetune-trainer .
#
# CUDA: the base is plain Python on purpose. torch==2.14.1 from PyPI is the CUDA build and
# brings its own CUDA runtime, cuBLAS and cuDNN as nvidia-* wheels; an nvidia/cuda or
# pytorch/pytorch base would add a second, differently versioned copy (gigabytes). The GPU
# driver comes from the node through the NVIDIA container runtime / device plugin, as with
# any CUDA image. The same image runs CPU-only (gpusPerWorker: 0).

# The base image: the official one by default; `make images` passes a local stand-in built
# from Debian packages where no registry can be reached (docker/images.py).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# pyproject.toml names README.md as the long description: a one-line stand-in keeps the README
# (edited far more often than the code) out of the inputs, so a docs change rebuilds no image.
COPY pyproject.toml ./
RUN echo "FineTune Operator: see the project's README.md" > README.md
COPY trainer/ trainer/
COPY operator/ operator/
# WHEELS: a directory of wheels mounted into the build (`make images` mounts this machine's
# at /wheels); empty, the default, installs from the package index as usual.
ARG WHEELS=""
# Versions (torch==2.14.1, torchvision==0.29.1, ...) are pinned in pyproject.toml; the `operator`
# extra (kopf) must not be installed here.
# DL3013 wants `pkg==version`; the project itself is not pinnable and its dependencies are.
# hadolint ignore=DL3013
RUN if [ -n "$WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"; fi \
    && pip install --no-cache-dir ".[trainer]" \
    && if pip show kopf >/dev/null 2>&1; then echo "kopf must not be in the trainer image" >&2; exit 1; fi

FROM ${BASE_IMAGE}
# Numeric UID/GID 1000: the operator's trainer pods run as runAsUser/fsGroup 1000.
RUN groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer
COPY --from=build /opt/venv /opt/venv
# NVIDIA_*: ask the NVIDIA container runtime to mount the driver's compute libraries.
# MPLCONFIGDIR/TORCH_HOME: caches in writable places whatever the home directory is.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch
USER 1000:1000
WORKDIR /home/trainer
# 9400: rank 0's Prometheus metrics; 29500: the torchrun rendezvous (master port).
EXPOSE 9400 29500
# The operator sets the full command (finetune-launch --nnodes ... -m finetune.cli train ...);
# finetune-launch is torchrun that passes the failed worker's exit code through.
# Run by hand, the image starts a single-process run: append `train` flags after the image name,
# e.g. `docker run IMAGE --data /data/data.yaml --model yolov5n --epochs 1 --device cpu`.
ENTRYPOINT ["finetune-launch", "--standalone", "--nproc-per-node=1", "-m", "finetune.cli", "train"]
CMD ["--help"]
