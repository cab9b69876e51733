"""ComfyUI entry point of the Stepwise-Flow-GRPO node pack: ``comfy_entrypoint`` returns the pack's ComfyExtension.

The nodes load only inside ComfyUI (they are built on its comfy_api). Imported anywhere else, for example by
pytest setting up the repository folder, nothing is exported; the training library is ``sfgrpo_core`` and runs
without ComfyUI. Importing this file changes nothing in ComfyUI: the extension's side effects (the sfgrpo names
in KSampler's sampler list, the mini world's folders for the stock loaders) happen when ComfyUI loads it.
"""

import importlib.util

if __package__ and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    __all__ = ["WEB_DIRECTORY"]

# Node help pages (web/docs/<node id>.md) for the frontend's node library.
WEB_DIRECTORY = "./web"
