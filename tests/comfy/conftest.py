"""A real ComfyUI for these tests: $COMFYUI_PATH or the offline 0.3.75 (obtained on first use), one server a session.

Nothing is skipped: when ComfyUI or its requirements cannot be had, the tests fail with the reason.
"""

from pathlib import Path

import pytest

from sfgrpo_core.comfyui_server import ComfyServer, ComfyUIError, ensure_comfyui


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """The ComfyUI folder, with its requirements installed in this venv (seconds once cached)."""
    try:
        return ensure_comfyui(install_requirements=True)
    except ComfyUIError as error:
        pytest.fail(f"no ComfyUI for the tests: {error}", pytrace=False)


@pytest.fixture(scope="session")
def comfy_server(comfyui, tmp_path_factory):
    """A headless ComfyUI on CPU with this pack loaded, shared by the session (~6 s to start)."""
    with ComfyServer(tmp_path_factory.mktemp("comfy_server"), comfyui=comfyui) as server:
        yield server
