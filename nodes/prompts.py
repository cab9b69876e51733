"""Prompt sets for training (SFGRPOPrompts) and the mini world's text side (its text encoder as a CLIP, its prompt
lists), plus registering the mini world's transformer and VAE with ComfyUI's stock UNETLoader / VAELoader."""

from __future__ import annotations

import functools
from typing import Any

from comfy_api.latest import io

from ..sfgrpo_core.miniworld.build import WEIGHTS_DIR
from .types import CATEGORY, Prompts, PromptSet

MINIWORLD_CATEGORY = f"{CATEGORY}/mini world"


def prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def encode_prompt_set(clip: Any, texts: list[str]) -> PromptSet:
    """Encode each distinct text once with ``clip`` (any ComfyUI CLIP, or the mini world's ``MiniWorldCLIP``).

    Repeated texts stay in the list: a prompt listed twice is drawn twice as often in training and evaluated twice,
    as in a config file's prompt list.
    """
    encoded = {text: clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in dict.fromkeys(texts)}
    return PromptSet(texts=tuple(texts), conditionings=tuple(encoded[text] for text in texts))


class SFGRPOPrompts(io.ComfyNode):
    """CLIP + one prompt per line -> PROMPTS (each text with its own conditioning) for training and evaluation."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOPrompts", display_name="Stepwise-Flow-GRPO Prompts", category=CATEGORY,
            description="Encodes a list of prompts, one per line, for the LoRA trainer (each prompt becomes one "
                        "group of samples per iteration).",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (CLIP) of the model being trained; for the mini "
                                              "world, the Mini World Text Encoder."),
                io.String.Input("text", multiline=True, default="a red circle\na blue square",
                                tooltip="One prompt per line. Empty lines and lines starting with # are ignored; "
                                        "a prompt listed twice is drawn twice as often."),
            ],
            outputs=[Prompts.Output(display_name="prompts", tooltip="The prompts with their conditioning.")],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: no text encoder is connected; connect the CLIP output of your model loader")
        texts = prompt_lines(text)
        if not texts:
            raise ValueError("text: no prompts given; write at least one prompt, one per line")
        return io.NodeOutput(encode_prompt_set(clip, texts))


class MiniWorldCLIP:
    """The mini world's text encoder behind the two CLIP methods ComfyUI's text nodes call (CLIPTextEncode,
    SFGRPOPrompts): tokenize and encode_from_tokens_scheduled. Its conditioning is SD3-shaped:
    [[context [1, 12, 64], {"pooled_output": [1, 64]}]]; the empty prompt encodes to zeros (= ConditioningZeroOut).
    """

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def tokenize(self, text: str, **_: Any) -> dict[str, str]:
        from ..sfgrpo_core.miniworld.text import tokenize

        tokenize([text])  # raises ValueError naming an unknown word now, in the node that got the text
        return {"text": text}

    def encode_from_tokens(self, tokens: dict[str, str], return_pooled: bool = False, return_dict: bool = False):
        import torch

        with torch.no_grad():
            encoded = self.encoder.encode([tokens["text"]])
        context, pooled = encoded["context"].float(), encoded["pooled"].float()
        if return_dict:
            return {"cond": context, "pooled_output": pooled}
        return (context, pooled) if return_pooled else context

    def encode_from_tokens_scheduled(self, tokens: dict[str, str], unprojected: bool = False,
                                     add_dict: dict | None = None, show_pbar: bool = True) -> list:
        encoded = self.encode_from_tokens(tokens, return_dict=True)
        context = encoded.pop("cond")
        return [[context, {**encoded, **(add_dict or {})}]]

    def clone(self) -> MiniWorldCLIP:
        return self


@functools.cache
def mini_world_text_encoder():
    """The committed mini world's text encoder (float32, frozen), loaded once."""
    from ..sfgrpo_core.miniworld.build import TEXT_ENCODER_FILE
    from ..sfgrpo_core.miniworld.text import load_text_encoder

    return load_text_encoder(WEIGHTS_DIR / TEXT_ENCODER_FILE)


class SFGRPOMiniWorldTextEncoder(io.ComfyNode):
    """The mini world's text encoder as a CLIP, for CLIPTextEncode and SFGRPOPrompts."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOMiniWorldTextEncoder", display_name="Mini World Text Encoder", category=MINIWORLD_CATEGORY,
            description="Loads the text encoder of the project's mini world (a tiny SD3 of flat coloured shapes). "
                        "Its transformer and VAE are in the stock Load Diffusion Model and Load VAE lists as "
                        "mini_sd3_transformer.safetensors and mini_taesd.safetensors.",
            inputs=[],
            outputs=[io.Clip.Output(display_name="clip", tooltip="Connect to CLIPTextEncode or the Prompts node. "
                                                                   "It knows only mini-world words.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(MiniWorldCLIP(mini_world_text_encoder()))


class SFGRPOMiniWorldPromptList(io.ComfyNode):
    """The mini world's train or held-out captions, one per line (for SFGRPOPrompts)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOMiniWorldPromptList", display_name="Mini World Prompt List", category=MINIWORLD_CATEGORY,
            description="Captions of the mini world: 'train' compositions for training, 'heldout' compositions "
                        "(never trained on) to measure generalisation, balanced over the six GenEval categories.",
            inputs=[
                io.Combo.Input("split", options=["train", "heldout"], default="train",
                               tooltip="train: the train split's captions; heldout: a fixed category-balanced "
                                       "held-out list."),
                io.Int.Input("per_category", default=4, min=1, max=1000,
                             tooltip="Captions per category (six categories); train draws them with the seed."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Which captions are drawn."),
            ],
            outputs=[io.String.Output(display_name="text", tooltip="One caption per line.")],
        )

    @classmethod
    def execute(cls, split, per_category, seed) -> io.NodeOutput:
        import numpy as np

        from ..sfgrpo_core.miniworld.denoiser import heldout_prompt_set
        from ..sfgrpo_core.miniworld.scenes import CATEGORIES, train_prompts

        if split == "heldout":
            return io.NodeOutput("\n".join(heldout_prompt_set(per_category, seed)))
        rng = np.random.default_rng(seed)
        lines = []
        for category in CATEGORIES:
            pool = train_prompts(category)
            # sorted: the whole split comes in its own order, the same list `sfgrpo train` uses by default
            chosen = sorted(rng.choice(len(pool), min(per_category, len(pool)), replace=False))
            lines += [pool[index] for index in chosen]
        return io.NodeOutput("\n".join(lines))


def register_mini_world_folders() -> None:
    """List the committed mini world's transformer in UNETLoader, its VAE in VAELoader and its demo LoRA in the LoRA
    loaders, each only there (once; no-op outside ComfyUI). The text encoder is loaded by
    SFGRPOMiniWorldTextEncoder, not by a stock loader. The demo LoRA (mini_world_stepwise_demo.safetensors, trained
    with configs/miniworld.yaml; docs/results.md says how far it moves MiniGenEval) lets workflows/sample_with_lora
    run on a fresh install."""
    try:
        import folder_paths
    except ImportError:
        return
    for folder in ("diffusion_models", "vae", "loras"):
        path = str(WEIGHTS_DIR / folder)
        if path not in folder_paths.get_folder_paths(folder):
            folder_paths.add_model_folder_path(folder, path)



NODES = [SFGRPOPrompts, SFGRPOMiniWorldTextEncoder, SFGRPOMiniWorldPromptList]
