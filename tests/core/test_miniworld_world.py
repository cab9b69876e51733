"""The committed mini world through the diffusers backend: it samples images, and a short Stepwise-Flow-GRPO run
trains a LoRA that changes the samples and is exported in the diffusers and ComfyUI formats.

(Raising the held-out reward within a few CPU minutes is not reached yet: see configs/miniworld.yaml.)"""

import pytest
import torch

from sfgrpo_core import models, rewards
from sfgrpo_core.algorithm.schedule import flow_sigmas
from sfgrpo_core.algorithm.sde import get_step_function
from sfgrpo_core.config import load_config
from sfgrpo_core.training.rollout import make_prompt_batch, rollout


@pytest.fixture(scope="module")
def world():
    import sfgrpo_core.miniworld.world  # noqa: F401  (registers the backend)

    return models.build("miniworld")


def test_samples_decode_to_images_and_score(world):
    batch = make_prompt_batch(world, ["a red circle", "two blue squares"], 2, seed=0, iteration=0)
    samples = rollout(world, batch, flow_sigmas(10, 3.0), get_step_function("ode", 0.0)).final
    images = world.decode(samples)
    assert images.dtype == torch.uint8 and images.shape == (4, 64, 64, 3)
    scores = rewards.score(rewards.load("mini_geneval"), images, batch.prompts).values
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert world.default_prompts and world.default_eval_prompts
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        world.encode_prompts(["a red dog"])


def test_a_short_run_trains_a_lora_that_changes_samples(tmp_path, request):
    from sfgrpo_core.lora.adapters import adapter_disabled
    from sfgrpo_core.training.trainer import train

    config = load_config(request.config.rootpath / "configs" / "miniworld.yaml").replace(**{
        "train.output_dir": str(tmp_path / "run"), "train.prompts": ["a red circle", "a green square"],
        "train.eval_prompts": ["a red circle"], "train.eval_samples": 2, "train.iterations": 3,
        "train.eval_every": 3, "train.group_size": 4, "train.groups_per_iteration": 2})
    result = train(config)
    record = result.records[0]
    assert record["active_transitions"] > 0 and record["reward_missing"] == 0
    assert 0 <= record["reward_mean"] <= 1 and len(record["step_reward_mean"]) == 9
    model = result.model
    batch = make_prompt_batch(model, ["a red circle"], 4, seed=1, iteration=0)
    tuned = rollout(model, batch, flow_sigmas(10, 3.0), get_step_function("ode", 0.0)).final
    with adapter_disabled(model.module):
        base = rollout(model, batch, flow_sigmas(10, 3.0), get_step_function("ode", 0.0)).final
    assert (tuned - base).abs().max() > 1e-3
    from safetensors.torch import load_file

    # One file for diffusers and for ComfyUI's stock LoRA loaders (tests/comfy loads it there).
    diffusers = load_file(str(result.run_dir / "lora_diffusers.safetensors"))
    assert any(key.endswith("transformer_blocks.0.attn.to_q.lora_A.weight") for key in diffusers)
    assert not (result.run_dir / "lora_comfyui.safetensors").exists()
