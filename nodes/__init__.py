"""ComfyUI nodes: a thin adapter over sfgrpo_core. Every module lists its V3 node classes in NODES."""

from typing import Any

from comfy_api.latest import ComfyExtension

from . import credit_signal, preview, prompts, rewards, routes, sampler, train

NODES: list[Any] = [*sampler.NODES, *prompts.NODES, *rewards.NODES, *preview.NODES, *train.NODES,
                    *credit_signal.NODES]


def register_with_comfyui() -> None:
    """What the pack adds to ComfyUI besides its nodes (idempotent): the sfgrpo SDE names in the stock KSampler and
    KSamplerSelect lists, the mini world's folders for UNETLoader, VAELoader and the LoRA loaders, models/rewards for
    Load Reward's weights, and the route the training view refills its chart from (GET /sfgrpo/training)."""
    sampler.register_ksampler_names()
    prompts.register_mini_world_folders()
    rewards.register_reward_folder()
    routes.register_routes()


class StepwiseFlowGRPOExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_with_comfyui()

    async def get_node_list(self) -> list[Any]:
        # ComfyUI 0.3.75 asks for the node list but never calls on_load: register here too (it is idempotent).
        register_with_comfyui()
        return list(NODES)


async def comfy_entrypoint() -> StepwiseFlowGRPOExtension:
    return StepwiseFlowGRPOExtension()


__all__ = ["NODES", "comfy_entrypoint", "register_with_comfyui"]
