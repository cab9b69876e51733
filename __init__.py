"""ComfyUI entry point of the Stepwise-Flow-GRPO node pack.

Cheap to import: the nodes (and torch-heavy modules) load inside ComfyUI only. The training library is
``sfgrpo_core`` and runs without ComfyUI.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
