"""ComfyUI entry point of the Stepwise-Flow-GRPO node pack.

The nodes load only inside ComfyUI (they are built on its comfy_api). Imported anywhere else, for example by
pytest setting up the repository folder, the node table is empty; the training library is ``sfgrpo_core`` and runs
without ComfyUI.
"""

import importlib.util

if __package__ and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# Node help pages (web/docs/<node id>.md) for the frontend's node library.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
