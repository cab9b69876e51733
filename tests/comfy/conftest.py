"""A real ComfyUI for these tests: $COMFYUI_PATH or the offline 0.3.75 (obtained on first use), one server a session.

Nothing is skipped: when ComfyUI or its requirements cannot be had, the tests fail with the reason.
"""

import contextlib
import logging
from pathlib import Path

import pytest

from sfgrpo_core.headless.server import ComfyServer, ComfyUIError, ensure_comfyui


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


def capture_node(store: dict, inputs: dict[str, tuple], *, input_is_list: bool = False) -> type:
    """A test-only ComfyUI output node class that keeps what it is given in ``store[key]``.

    Args:
        store: where each execution's inputs go, under the node's ``key`` input.
        inputs: the optional inputs it takes, name -> ComfyUI V1 type spec (e.g. ``("IMAGE",)``).
        input_is_list: take whole lists (ComfyUI's INPUT_IS_LIST), e.g. a FLOAT list output.
    """

    def capture(self, key, **values):
        store[key[0] if input_is_list else key] = values
        return {}

    return type("TestCapture", (), {
        "RETURN_TYPES": (), "FUNCTION": "capture", "CATEGORY": "testing", "OUTPUT_NODE": True,
        "INPUT_IS_LIST": input_is_list, "capture": capture,
        "INPUT_TYPES": classmethod(lambda cls: {"required": {"key": ("STRING", {"default": ""})},
                                                "optional": dict(inputs)}),
    })


class _FakeServer:
    """The few PromptServer attributes PromptExecutor uses; records every message it is sent."""

    def __init__(self):
        self.client_id = "tests"
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class ComfyEngine:
    """ComfyUI's execution engine in this process: validate and run API-format prompts, no HTTP. ``root`` holds its
    output/, temp/ and loras/ folders."""

    def __init__(self, nodes_module, execution_module, root: Path):
        self.nodes, self.execution, self.root = nodes_module, execution_module, root

    def pack_module(self, name: str):
        """A module of the pack as ComfyUI imported it (its own copy, not the test's ``sfgrpo_core`` import)."""
        import importlib

        package = self.nodes.NODE_CLASS_MAPPINGS["SFGRPOTrainLoRA"].__module__.rsplit(".", 1)[0]
        return importlib.import_module(f"{package}.{name}")

    @staticmethod
    @contextlib.contextmanager
    def logged():
        """The messages logged (root logger) within the block, as a list that fills while it runs."""
        messages: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())

        handler = Collect()
        logging.getLogger().addHandler(handler)
        try:
            yield messages
        finally:
            logging.getLogger().removeHandler(handler)

    def add_capture_node(self, name: str, store: dict, inputs: dict[str, tuple], *,
                         input_is_list: bool = False) -> None:
        """Register a test-only output node ``name`` that keeps its inputs in ``store`` (see ``capture_node``)."""
        self.nodes.NODE_CLASS_MAPPINGS[name] = capture_node(store, inputs, input_is_list=input_is_list)

    def run(self, prompt: dict) -> _FakeServer:
        """Validate and execute ``prompt`` with a fresh executor (nothing cached); the server holds the messages.

        Raises:
            AssertionError: when validation fails (with ComfyUI's node errors).
        """
        import asyncio
        import uuid

        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        assert valid, (error, node_errors)
        server = _FakeServer()
        executor = self.execution.PromptExecutor(server, cache_type=self.execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        executor.execute(prompt, prompt_id, {"client_id": server.client_id}, outputs)
        return server


@pytest.fixture(scope="session")
def comfy_engine(comfyui, tmp_path_factory) -> ComfyEngine:
    """ComfyUI (CPU) imported in this process with the pack loaded from a custom_nodes symlink named ``sfgrpo``
    (the pack lists the committed mini world under "diffusion_models" and "vae" itself); one per session."""
    import asyncio
    import importlib
    import sys

    root = tmp_path_factory.mktemp("comfy_engine")
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "sfgrpo").symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    sys.path.insert(0, str(comfyui))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        importlib.import_module("utils.extra_config")  # ComfyUI's order: before nodes
        import execution
        import folder_paths

        import nodes
    finally:
        sys.argv = argv
    # Everything the nodes write stays in this session's temporary tree, never in the (cached) ComfyUI folder.
    for folder in ("output", "loras", "temp"):
        (root / folder).mkdir()
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    folder_paths.add_model_folder_path("loras", str(root / "loras"), is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(root / "custom_nodes" / "sfgrpo"))):
        pytest.fail("the sfgrpo pack failed to load in ComfyUI", pytrace=False)
    return ComfyEngine(nodes, execution, root)
