# FineTune Operator — developer entry points. `make demo` and `make test` do all set-up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's python (world-readable, unlike a pyenv under /root) so that non-root trainer
# processes started by the test node agent can run the same environment.
SYSTEM_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)

.PHONY: setup demo test test-fast lint readme-results contract-doc bench device-wheels cluster-demo images test-images clean

$(VENV)/.installed: pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[trainer,operator,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m finetune.demo

# Re-measure the demo and rewrite README's results section and docs/demo/*.png.
readme-results: setup
	$(PY) -m finetune.demo --update-readme README.md

# Regenerate docs/trainer-contract.md's flag and hyperparameter tables from finetune.config.
contract-doc: setup
	$(PY) -m finetune.config --update-doc docs/trainer-contract.md

# A real control plane + node agent on this machine (root): install the chart, apply the
# CPU sample FineTune and watch it train. See tests/cluster/README.md.
cluster-demo: setup
	$(PY) tests/cluster/cluster_demo.py

# Both images from docker/*.Dockerfile with buildah, on a local base built from Debian packages
# and this machine's wheels; cached under /var/cache/finetune-images by a hash of their inputs,
# then checked from the inside (size budget, one libcudart, entrypoints as the numeric USER).
images: setup
	$(PY) docker/images.py build

# The images run as a cluster runs them (runc; tests/images): training, the operator on the
# control plane, the node agent's image mode. Part of `make test` too.
test-images: images
	$(PY) -m pytest tests/images

bench: setup
	$(PY) bench/freeze.py

# Wheels the GPU machine's image lacks, for `bash bench/gpu.sh` there (see that script).
device-wheels: setup
	$(VENV)/bin/pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device-wheels pycocotools==2.0.11

# The whole suite (what .ci/run calls). The images first (`make images` without its checks:
# tests/images/test_images.py::test_image_checks runs them): tests/images and the end-to-end
# tests (their worker pods run from the trainer image) use them; cached by their inputs' hash.
test: setup
	$(PY) docker/images.py build --no-check
	$(PY) -m pytest --durations=15

test-fast: setup
	$(PY) -m pytest -m "not slow and not cluster"

lint: setup
	$(VENV)/bin/ruff check trainer operator bench tests docker

clean:
	rm -rf runs .pytest_cache
