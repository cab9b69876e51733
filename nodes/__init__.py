"""ComfyUI nodes: a thin adapter over sfgrpo_core. One table of node id -> class -> display name."""

from .sampler import NODE_CLASS_MAPPINGS as _SAMPLER_NODES
from .sampler import NODE_DISPLAY_NAME_MAPPINGS as _SAMPLER_NAMES

NODE_CLASS_MAPPINGS = {**_SAMPLER_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**_SAMPLER_NAMES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
