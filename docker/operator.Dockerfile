# syntax=docker/dockerfile:1
# FineTune operator image: kopf + the Kubernetes client (the `operator` extra), never torch.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t finetune-operator .

# The base image: the official one by default; `make images` passes a local stand-in built
# from Debian packages where no registry can be reached (docker/images.py).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtualenv, so the runtime stage copies exactly the installed packages and no build tools.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the wheel is built from (see .dockerignore); both package roots are needed because
# setuptools discovers packages under trainer/ and operator/ (the operator reads model configs).
# pyproject.toml names README.md as the long description: a one-line stand-in keeps the README
# (edited far more often than the code) out of the inputs, so a docs change rebuilds no image.
COPY pyproject.toml ./
RUN echo "FineTune Operator: see the project's README.md" > README.md
COPY trainer/ trainer/
COPY operator/ operator/
# WHEELS: a directory of wheels mounted into the build (`make images` mounts this machine's
# at /wheels); empty, the default, installs from the package index as usual.
ARG WHEELS=""
# Versions are pinned in pyproject.toml; `.[operator]` must not pull the `trainer` extra.
# DL3013 wants `pkg==version`; the project itself is not pinnable and its dependencies are.
# hadolint ignore=DL3013
RUN if [ -n "$WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"; fi \
    && pip install --no-cache-dir ".[operator]" \
    && if pip show torch >/dev/null 2>&1; then echo "torch must not be in the operator image" >&2; exit 1; fi

FROM ${BASE_IMAGE}
# Numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric USER.
# A passwd entry too, because libraries asking for the user name (getpass) fail without one;
# not "operator": Debian's base-passwd already has that group (gid 37), so groupadd would fail.
RUN groupadd --gid 10001 finetune \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 8080: operator metrics; 8081: kopf liveness (/healthz).
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]
# Cluster-wide by default; the Helm chart passes --all-namespaces or --namespace=NS explicitly.
CMD ["--all-namespaces"]
