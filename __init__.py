"""ComfyUI entry point of the Stepwise-Flow-GRPO node pack.

Cheap to import: only the node table and the light sampler math load here. The training library is
``sfgrpo_core`` and runs without ComfyUI.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain file, e.g. by pytest setting up the repository folder: there is no pack to load
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
