"""The committed mini world as a VelocityModel (backend name "miniworld"): the tiny SD3 transformer, its text
encoder and the TAESD autoencoder, through the same diffusers backend that serves real SD3.5 / FLUX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..models.base import register_backend
from ..models.diffusers_backend import DiffusersFlowModel
from ..models.precision import fast_autocast_dtype
from .build import TEXT_ENCODER_FILE, TRANSFORMER_FILE, VAE_DIFFUSERS_DIR, WEIGHTS_DIR
from .denoiser import LATENT_CHANNELS, LATENT_SIZE, heldout_prompt_set
from .scenes import train_prompts
from .text import MiniTextEncoder, load_text_encoder


def load_components(weights_dir: str | Path = WEIGHTS_DIR) -> tuple[nn.Module, MiniTextEncoder, Any]:
    """(transformer, text encoder, diffusers AutoencoderTiny) in float32, frozen, from a built weights folder."""
    from diffusers import AutoencoderTiny, SD3Transformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    if not (weights_dir / TRANSFORMER_FILE).is_file():
        raise ValueError(f"model.path: {str(weights_dir)!r} holds no mini world ({TRANSFORMER_FILE} missing); run "
                         "`sfgrpo miniworld build --out DIR` or leave model.path empty for the committed one")
    with safe_open(str(weights_dir / TRANSFORMER_FILE), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    # Type checkers resolve `from diffusers import ...` to diffusers' torch-less dummy classes, not nn.Modules.
    transformer = cast(nn.Module, SD3Transformer2DModel(**config))
    transformer.load_state_dict({k: v.float() for k, v in load_file(str(weights_dir / TRANSFORMER_FILE)).items()})
    text_encoder = load_text_encoder(weights_dir / TEXT_ENCODER_FILE)
    vae = AutoencoderTiny.from_pretrained(str(weights_dir / VAE_DIFFUSERS_DIR), torch_dtype=torch.float32)
    for module in (transformer, text_encoder, vae):
        module.train(False).requires_grad_(False)
    return transformer, text_encoder, vae


def build_mini_world(path: str = "", device: str = "cpu", **_: object) -> DiffusersFlowModel:
    """The mini world from ``path`` (a weights folder) or, when empty, the committed weights."""
    transformer, text_encoder, vae = load_components(path or WEIGHTS_DIR)
    text_encoder = text_encoder.to(device)

    @torch.no_grad()
    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        return text_encoder.encode(prompts)

    return DiffusersFlowModel(
        transformer, vae, encode, vae_scaling_factor=float(vae.config.scaling_factor), vae_shift_factor=0.0,
        latent_channels=LATENT_CHANNELS, latent_size=(LATENT_SIZE, LATENT_SIZE), default_prompts=train_prompts(),
        default_eval_prompts=heldout_prompt_set(4), device=device,
        decode_dtype=fast_autocast_dtype(device))


register_backend("miniworld", build_mini_world)
