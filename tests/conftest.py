"""Shared fixtures. Tests live in tests/core (seconds, no ComfyUI), tests/comfy (a real ComfyUI, in-process and over
HTTP, and the browser), tests/e2e (training runs) and tests/gpu (CUDA only)."""

import os
from pathlib import Path

import pytest
import torch

from sfgrpo_core.config import load_config
from sfgrpo_core.models import toy

TOY_CONFIG = "configs/toy.yaml"
SLOW_FOLDERS = {"comfy", "e2e", "gpu"}


def pytest_collection_modifyitems(config, items):
    """Every test outside tests/core is slow (a ComfyUI server, a training run, a GPU): `make test-fast` leaves
    them out with -m "not slow"."""
    tests = Path(__file__).parent
    for item in items:
        relative = Path(str(item.fspath)).resolve().relative_to(tests)
        if relative.parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def toy_base_path(tmp_path_factory):
    """The toy world's pretrained base, built once per test session (~5 s) and shared through a file."""
    path = tmp_path_factory.mktemp("toy_base") / "toy_base.safetensors"
    from safetensors.torch import save_file

    save_file(toy.pretrain().state_dict(), str(path))
    return path


@pytest.fixture
def toy_config(toy_base_path, tmp_path, request):
    """configs/toy.yaml with the shared base weights and a fresh run folder."""
    root = request.config.rootpath
    return load_config(root / TOY_CONFIG).replace(**{"model.path": str(toy_base_path),
                                                      "train.output_dir": str(tmp_path / "run")})


def threads_per_worker() -> int:
    """The cores each test process may use: all of them (at most 2) alone, an even share under pytest-xdist's
    ``-n N``, so that N workers never run more torch threads than there are cores (oversubscribed threads made the
    core tests ~10x slower on 2 cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


def pytest_configure(config):
    # Subprocesses (the CLI, accelerate's workers, ComfyUI servers) inherit the worker's share too.
    if "PYTEST_XDIST_WORKER" in os.environ:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, str(threads_per_worker()))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(threads_per_worker())
    yield
