"""The mini world's 16-channel TAESD-architecture autoencoder: training on scenes, and export in two formats.

diffusers' AutoencoderTiny has TAESD's architecture (ComfyUI's taesd layout: widths 64, 8x downsampling). Its
encoder takes images in [-1, 1] and its decoder returns [-1, 1]; internally TAESD works in [0, 1] and clamps
latents with tanh(x / 3) * 3, so raw latents live roughly in [-3, 3].

Latent convention of the mini world: the flow model sees ``scaling_factor * raw`` (unit-ish std); the diffusers
export stores that factor in the config (shift 0), and the ComfyUI export folds it into TAESD's vae_scale so
ComfyUI's fixed SD3 latent format (scale 1.5305, shift 0.0609) lands on the same numbers:
comfy = raw / vae_scale + vae_shift and model = (comfy - 0.0609) * 1.5305, so vae_shift = 0.0609 and
vae_scale = 1.5305 / scaling_factor give model = scaling_factor * raw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..models.precision import fast_autocast
from .scenes import CATEGORIES, Split, sample_scene

SD3_LATENT_SCALE = 1.5305
SD3_LATENT_SHIFT = 0.0609


def make_autoencoder(seed: int = 0):
    """A fresh 16-latent-channel AutoencoderTiny with TAESD's default widths, deterministically initialised."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=16)


def scene_batch(seeds: range | list[int], split: Split | None = "train") -> torch.Tensor:
    """Images of the scenes with these seeds as float [B, 3, 64, 64] in [-1, 1] (categories cycle with the seed)."""
    images = np.stack([sample_scene(seed, CATEGORIES[seed % len(CATEGORIES)], split=split).image for seed in seeds])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3], rounded exactly as final images are."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of uint8 images."""
    error = ((reference.float() - reconstruction.float()) ** 2).mean().item()
    return 99.0 if error == 0 else 10 * math.log10(255.0**2 / error)


@dataclass(frozen=True)
class AutoencoderReport:
    steps: int
    seconds: float
    heldout_psnr: float
    scaling_factor: float


def train_autoencoder(steps: int, *, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
                      progress: Callable[[int, float], None] | None = None):
    """Train on freshly rendered train-split scenes (reconstruction MSE in [-1, 1]), channels_last,
    in bfloat16 autocast where the CPU runs it natively and faster (models.precision), float32 elsewhere.

    Returns (the autoencoder in eval mode, float32, and its report on 256 held-out scenes).
    """
    vae = make_autoencoder(seed).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(steps):
        images = scene_batch(range(seed * 10**7 + step * batch_size, seed * 10**7 + (step + 1) * batch_size))
        images = images.contiguous(memory_format=torch.channels_last)
        with fast_autocast("cpu"):
            latents = vae.encoder(images)
            reconstruction = vae.decoder(latents)
        loss = ((reconstruction.float() - images) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    vae = vae.train(False).requires_grad_(False).to(memory_format=torch.contiguous_format)
    heldout = scene_batch(range(10**9, 10**9 + 256), split="heldout")
    with torch.no_grad():
        latents = vae.encoder(heldout)
        quality = psnr(to_uint8(heldout), to_uint8(vae.decoder(latents)))
    scaling = 1.0 / float(latents.std())
    return vae, AutoencoderReport(steps, time.perf_counter() - start, quality, scaling)


def taesd_state_dict(vae, scaling_factor: float) -> dict[str, torch.Tensor]:
    """The ComfyUI TAESD format ("taesd_encoder.*", "taesd_decoder.*", "vae_scale", "vae_shift").

    diffusers' decoder Sequential lacks TAESD's leading Clamp module, so decoder layer j is taesd_decoder.(j + 1).
    """
    state = {}
    for key, tensor in vae.state_dict().items():
        part, _, rest = key.partition(".layers.")
        index, _, tail = rest.partition(".")
        if part == "encoder":
            state[f"taesd_encoder.{index}.{tail}"] = tensor
        elif part == "decoder":
            state[f"taesd_decoder.{int(index) + 1}.{tail}"] = tensor
        else:
            raise ValueError(f"unexpected AutoencoderTiny key {key!r}")
    state["vae_scale"] = torch.tensor(SD3_LATENT_SCALE / scaling_factor)
    state["vae_shift"] = torch.tensor(SD3_LATENT_SHIFT)
    return state
