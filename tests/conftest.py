"""Shared fixtures. Tests live in tests/core (seconds, no ComfyUI), tests/comfy and tests/e2e (later issues)."""

import pytest
import torch

from sfgrpo_core.config import load_config
from sfgrpo_core.models import toy

TOY_CONFIG = "configs/toy.yaml"


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


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield
