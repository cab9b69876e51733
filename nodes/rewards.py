"""Rewards in ComfyUI: load one from the core registry (SFGRPOLoadReward) and score images with it (SFGRPOScore).

The nodes go through ``sfgrpo_core.rewards`` exactly as the trainer does (the same registry, ``load`` and defensive
``score``), so a score seen on a node is the score the trainer would give that image. A reward backed by a torch
model is built once per (name, options) and lives on ComfyUI's offload device; it moves to ComfyUI's compute device
only while it scores (``on_compute_device``), after ComfyUI's model management freed room for it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import comfy.model_management
import torch
from comfy_api.latest import io, ui

from ..sfgrpo_core import rewards
from ..sfgrpo_core.finite_json import NonFiniteJSONError, loads_finite
from ..sfgrpo_core.images import to_uint8
from ..sfgrpo_core.rewards.folders import WEIGHTS, listed, mix_weights_options, weights_help, weights_options
from .prompts import prompt_lines
from .types import CATEGORY as PACK_CATEGORY
from .types import LoadedReward, Reward

CATEGORY = f"{PACK_CATEGORY}/rewards"


REWARDS_FOLDER = "rewards"  # ComfyUI's models/rewards (and extra_model_paths.yaml's "rewards:" entries)
AUTO_WEIGHTS = "auto"


def register_reward_folder() -> None:
    """Register ``models/rewards`` with ComfyUI's folder_paths (once; folders that extra_model_paths.yaml lists
    under ``rewards:`` join it), where Load Reward finds reward weights."""
    import os

    import folder_paths

    default = os.path.join(folder_paths.models_dir, REWARDS_FOLDER)
    if default not in folder_paths.folder_names_and_paths.get(REWARDS_FOLDER, ([], set()))[0]:
        folder_paths.add_model_folder_path(REWARDS_FOLDER, default)


def reward_folders() -> list[Path]:
    import folder_paths

    if REWARDS_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return [Path(folder) for folder in folder_paths.get_folder_paths(REWARDS_FOLDER)]


def load_reward(name: str, options: str, weights: str = AUTO_WEIGHTS) -> LoadedReward:
    """The registered reward ``name`` built with the keyword options of the JSON object ``options``; a model-backed
    reward's weights come from the rewards folders (``weights``: "auto" finds them by their hub names, another
    value names the folder or file to use) unless ``options`` names them.

    Raises:
        ValueError: "reward: ..." for an unknown name (listing the available ones); "options: ..." for text that
            is not a JSON object or options the reward's factory rejects (with what a rewards folder should hold);
            "weights: ..." for a name not in the rewards folders.
    """
    if name not in rewards.available():
        raise ValueError(f"reward: unknown reward {name!r}; choose one of: {', '.join(rewards.available())}")
    text = options.strip() or "{}"
    try:
        parsed = loads_finite(text)
    except NonFiniteJSONError as error:
        raise ValueError(f"options: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"options: not valid JSON ({error}); write a JSON object such as {{\"quality\": 90}}, "
                         f"or {{}} for the defaults") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"options: expected a JSON object of keyword options such as {{\"quality\": 90}}, got "
                         f"{type(parsed).__name__}")
    if weights != AUTO_WEIGHTS and name not in WEIGHTS:
        raise ValueError(f"weights: reward {name!r} reads no weights from a rewards folder; choose {AUTO_WEIGHTS!r}")
    folders = reward_folders()
    parsed = {**weights_options(name, folders, chosen=None if weights == AUTO_WEIGHTS else weights), **parsed}
    parsed = mix_weights_options(name, parsed, folders)
    options_json = json.dumps(parsed, sort_keys=True)
    # The factory too: a reward registered again under the same name (a plug-in reloaded) is built anew.
    key = (name, options_json, id(rewards.factory(name)))
    if key not in _LOADED:
        try:
            reward = rewards.load(name, **parsed)
        except (TypeError, ValueError) as error:  # unknown keyword (load turns it into ValueError) or a bad value
            where = weights_help(name, folders)
            raise ValueError(f"options: reward {name!r} rejected {options_json}: {error}"
                             + (f"\n{where}" if where else "")) from None
        if hasattr(reward, "torch_modules"):  # a TorchReward, or a mix holding some
            reward.to(comfy.model_management.unet_offload_device())
        _LOADED[key] = LoadedReward(name=name, options_json=options_json, reward=reward)
        while len(_LOADED) > LOADED_REWARDS_KEPT:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return _LOADED[key]


# Rewards built so far, most recently used last: a heavy reward model is loaded once, not at every run of a graph.
LOADED_REWARDS_KEPT = 2
_LOADED: OrderedDict[tuple[str, str, int], LoadedReward] = OrderedDict()


@contextmanager
def on_compute_device(loaded: LoadedReward) -> Iterator[None]:
    """Within the block, a torch-backed reward sits on ComfyUI's compute device (after ComfyUI freed memory for
    it, unloading other models if it must); afterwards it goes back to the offload device and its memory is freed.
    Rewards without torch modules are left as they are."""
    modules = loaded.reward.torch_modules() if hasattr(loaded.reward, "torch_modules") else []
    if not modules:
        yield
        return
    device = comfy.model_management.get_torch_device()
    size = sum(tensor.numel() * tensor.element_size() for module in modules
               for tensor in [*module.parameters(), *module.buffers()])
    comfy.model_management.free_memory(int(size * 1.2), device)
    loaded.reward.to(device)
    try:
        yield
    finally:
        loaded.reward.to(comfy.model_management.unet_offload_device())
        comfy.model_management.soft_empty_cache()


def options_help() -> str:
    """Every registered reward with its options and defaults, for the Load Reward node."""
    return "\n".join(rewards.describe(name) for name in rewards.available())


def score_images(loaded: LoadedReward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Scores [B] float32 of IMAGE ``images`` with one prompt each; NaN where the reward could not score an image.

    Raises:
        ValueError: "reward: ..." when the reward fails on every image (a configuration problem, e.g. a
            prompt-aware reward given prompts it does not understand).
    """
    try:
        with on_compute_device(loaded):
            return rewards.score(loaded.reward, to_uint8(images), prompts).values
    except rewards.RewardError as error:
        raise ValueError(f"reward: {loaded.name!r} could not score any of the {len(prompts)} images ({error}); "
                         f"check that the prompts are ones this reward understands") from None


def prompts_for(text: str, count: int, input_name: str = "prompts") -> list[str]:
    """One prompt per image from multiline ``text``: one line for every image, or exactly ``count`` lines.

    Empty text gives the empty prompt to every image (for rewards that ignore prompts, like JPEG size). Lines are
    read as ``prompt_lines`` reads them (blank lines and '#' comments are skipped).

    Raises:
        ValueError: "<input_name>: ..." with both counts when the number of lines fits neither case.
    """
    lines = prompt_lines(text)
    if not lines:
        return [""] * count
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{input_name}: {len(lines)} prompt lines for {count} images; give one line for all "
                         f"images or exactly one line per image")
    return lines


def format_scores(scores: list[float], mean: float) -> str:
    """The text shown on SFGRPOScore: one line per image ("missing" for NaN), then the mean."""
    lines = [f"image {index}: {'missing' if math.isnan(value) else f'{value:.4f}'}"
             for index, value in enumerate(scores)]
    scored = sum(not math.isnan(value) for value in scores)
    lines.append(f"mean: {'missing' if math.isnan(mean) else f'{mean:.4f}'} ({scored} of {len(scores)} scored)")
    return "\n".join(lines)


class SFGRPOLoadReward(io.ComfyNode):
    """A reward from the core registry, with its options as JSON."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOLoadReward", display_name="Stepwise-Flow-GRPO Load Reward", category=CATEGORY,
            description="Loads a reward the trainer can optimise and the Score / Tweedie Preview nodes can show "
                        "(the same registry as the sfgrpo CLI, installed plug-ins included). Each reward and its "
                        "options:\n" + options_help(),
            inputs=[
                # Read at every validation: rewards registered after the pack loaded appear too.
                io.Combo.Input("reward", options=rewards.available(),
                               default="mini_geneval" if "mini_geneval" in rewards.available() else None,
                               tooltip="The registered reward to load."),
                io.String.Input("options", multiline=True, default="{}",
                                tooltip='Keyword options of the reward as a JSON object, e.g. {"quality": 90} for '
                                        "the JPEG rewards; {} for the defaults. Each reward's options:\n"
                                        + options_help()),
                io.Combo.Input("weights", options=[AUTO_WEIGHTS, *listed(reward_folders())], default=AUTO_WEIGHTS,
                               optional=True,
                               tooltip="Where a model-backed reward (pickscore, clip, aesthetic, hps, imagereward) "
                                       "gets its weights: the files and folders in ComfyUI's models/rewards (and "
                                       "extra_model_paths.yaml's rewards: folders). 'auto' finds them by their hub "
                                       "names (PickScore_v1 and CLIP-ViT-H-14-laion2B-s32B-b79K for pickscore, "
                                       "clip-vit-large-patch14 for clip, sac+logos+ava1-l14-linearMSE for "
                                       "aesthetic's head, HPSv2 or HPS_v2.1_compressed.pt for hps, ImageReward); "
                                       "another entry is used as the reward's model. Options that name weights "
                                       "win."),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip="The loaded reward, for the Score, Tweedie "
                                                                  "Preview and trainer nodes.")],
        )

    @classmethod
    def execute(cls, reward: str, options: str, weights: str = AUTO_WEIGHTS) -> io.NodeOutput:
        return io.NodeOutput(load_reward(reward, options, weights))


class SFGRPOScore(io.ComfyNode):
    """Scores images with a reward and shows the scores on the node."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOScore", display_name="Stepwise-Flow-GRPO Score", category=CATEGORY,
            description="Scores each image with the reward, as the trainer would. An image the reward cannot "
                        "score is shown as missing (NaN), never as 0, and left out of the mean.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The images to score (a batch)."),
                Reward.Input("reward", tooltip="The reward, from Load Reward."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The prompt each image was made from, one per line: a single line for all "
                                        "images, or exactly one line per image. Prompt-aware rewards (mini_geneval) "
                                        "need it; leave empty for rewards that ignore prompts."),
            ],
            outputs=[
                io.Float.Output(display_name="scores", is_output_list=True,
                                tooltip="One score per image, in batch order; NaN where the image could not be "
                                        "scored."),
                io.Float.Output(display_name="mean", tooltip="Mean score over the scored images; NaN if none was "
                                                             "scored."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, reward: LoadedReward, prompts: str) -> io.NodeOutput:
        if not isinstance(reward, LoadedReward):
            raise ValueError("reward: expected the output of Stepwise-Flow-GRPO Load Reward")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected an RGB IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")
        scores = score_images(reward, images, prompts_for(prompts, images.shape[0]))
        scored = scores[~scores.isnan()]
        mean = scored.mean().item() if scored.numel() else math.nan
        values = scores.tolist()
        return io.NodeOutput(values, mean, ui=ui.PreviewText(format_scores(values, mean)))


NODES = [SFGRPOLoadReward, SFGRPOScore]
