"""The mini world's tiny SD3: an SD3Transformer2DModel pretrained with the rectified-flow loss on the
autoencoder's latents, jointly with the tiny text encoder, with caption dropout so classifier-free guidance works.

Shapes follow what ComfyUI's UNETLoader accepts for SD3 (attention_head_dim 64, num_layers == heads,
caption_projection_dim == 64 * heads: ComfyUI's model detection derives the widths from the weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..algorithm.schedule import flow_sigmas
from ..models.precision import fast_autocast
from .autoencoder import scene_batch
from .scenes import CATEGORIES, sample_scene
from .text import MiniTextEncoder, tokenize

LATENT_CHANNELS = 16
LATENT_SIZE = 8


def transformer_config(layers: int = 4) -> dict:
    """The SD3Transformer2DModel config of the mini world (heads == layers, as ComfyUI's loader infers it)."""
    return {"sample_size": LATENT_SIZE, "patch_size": 2, "in_channels": LATENT_CHANNELS, "num_layers": layers,
            "attention_head_dim": 64, "num_attention_heads": layers, "joint_attention_dim": 64,
            "caption_projection_dim": 64 * layers, "pooled_projection_dim": 64, "out_channels": LATENT_CHANNELS,
            "pos_embed_max_size": 16}


def make_transformer(layers: int = 4, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**transformer_config(layers))


def sd3_velocity(transformer, x: torch.Tensor, sigma: torch.Tensor, condition: dict[str, torch.Tensor]):
    """v = x1 - x0 from the SD3 transformer (diffusers' convention: timestep = 1000 * sigma)."""
    return transformer(hidden_states=x, encoder_hidden_states=condition["context"],
                       pooled_projections=condition["pooled"], timestep=sigma * 1000, return_dict=False)[0]


@dataclass(frozen=True)
class LatentDataset:
    latents: torch.Tensor  # [N, 16, 8, 8], already multiplied by the scaling factor
    tokens: torch.Tensor  # [N, L]


@torch.no_grad()
def encode_scenes(vae, scaling_factor: float, count: int, seed: int, batch_size: int = 64,
                  progress: Callable[[int], None] | None = None) -> LatentDataset:
    """Render ``count`` train-split scenes (categories in turn) and encode them once."""
    seeds = list(range(seed * 10**7, seed * 10**7 + count))
    latents, captions = [], []
    for start in range(0, count, batch_size):
        chunk = seeds[start : start + batch_size]
        with fast_autocast("cpu"):
            latents.append(vae.encoder(scene_batch(chunk)).float() * scaling_factor)
        captions += [sample_scene(s, CATEGORIES[s % len(CATEGORIES)], split="train").caption for s in chunk]
        if progress is not None:
            progress(start + len(chunk))
    return LatentDataset(torch.cat(latents), tokenize(captions))


@dataclass(frozen=True)
class DenoiserReport:
    steps: int
    seconds: float
    final_loss: float


def train_denoiser(data: LatentDataset, steps: int, *, layers: int = 4, batch_size: int = 128, lr: float = 1e-3,
                   caption_dropout: float = 0.1, seed: int = 0, progress: Callable[[int, float], None] | None = None):
    """Rectified-flow pretraining of (transformer, text encoder): loss |v_pred - (x1 - x0)|^2 with SD3's
    logit-normal timesteps; dropped captions are encoded as zeros (the unconditional branch)."""
    generator = torch.Generator().manual_seed(seed)
    transformer = make_transformer(layers, seed).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = MiniTextEncoder().train()
    parameters = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    start, loss_value = time.perf_counter(), float("nan")
    count = data.latents.shape[0]
    for step in range(steps):
        index = torch.randint(count, (batch_size,), generator=generator)
        x0, tokens = data.latents[index], data.tokens[index].clone()
        tokens[torch.rand(batch_size, generator=generator) < caption_dropout] = 0
        x1 = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=generator))
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * x1
        with fast_autocast("cpu"):
            context, pooled = text_encoder(tokens)
            velocity = sd3_velocity(transformer, xt, sigma, {"context": context, "pooled": pooled})
        loss = ((velocity.float() - (x1 - x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step, loss_value)
    transformer.train(False).requires_grad_(False)
    text_encoder.train(False).requires_grad_(False)
    return transformer, text_encoder, DenoiserReport(steps, time.perf_counter() - start, loss_value)


@torch.no_grad()
def sample(transformer, text_encoder, prompts: list[str], *, seed: int, steps: int = 10, shift: float = 3.0,
           guidance: float = 4.0) -> torch.Tensor:
    """ODE samples [B, 16, 8, 8] with classifier-free guidance (the unconditional branch is the zero condition)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=generator)
    condition = text_encoder.encode(prompts)
    empty = text_encoder.encode([""] * len(prompts))
    sigmas = flow_sigmas(steps, shift)
    for k in range(steps):
        sigma = sigmas[k].expand(len(prompts))
        conditional = sd3_velocity(transformer, x, sigma, condition)
        velocity = conditional
        if guidance != 1.0:
            unconditional = sd3_velocity(transformer, x, sigma, empty)
            velocity = unconditional + guidance * (conditional - unconditional)
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity
    return x


def heldout_prompt_set(per_category: int, seed: int = 0) -> list[str]:
    """A fixed, category-balanced list of held-out prompts (``per_category`` of each, with repetition if needed)."""
    from .scenes import heldout_prompts

    rng = np.random.default_rng(seed)
    prompts = []
    for category in CATEGORIES:
        pool = heldout_prompts(category)
        prompts += [pool[i] for i in rng.choice(len(pool), per_category, replace=len(pool) < per_category)]
    return prompts
