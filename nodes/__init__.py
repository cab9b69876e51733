"""ComfyUI nodes: a thin adapter over sfgrpo_core. Every module lists its V3 node classes in NODES."""

from typing import Any

from . import preview, prompts, rewards, sampler, train

NODES: list[Any] = [*sampler.NODES, *prompts.NODES, *rewards.NODES, *preview.NODES, *train.NODES]
NODE_CLASS_MAPPINGS = {node.define_schema().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.define_schema().node_id: node.define_schema().display_name for node in NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
