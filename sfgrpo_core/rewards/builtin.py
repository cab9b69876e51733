"""Built-in rewards that need no weights: DDPO's JPEG (in)compressibility and the toy world's mode closeness."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..models import toy
from . import register


def to_pil_images(images: Any) -> list[Image.Image]:
    """A list of PIL images from a list of PIL images or a uint8 array/tensor [B, H, W, 3]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
        return [Image.fromarray(image) for image in images]
    return [image.convert("RGB") for image in images]


class JpegSize:
    """DDPO's weight-free reward: the JPEG file size in kB at ``quality`` (x -1 for compressibility)."""

    def __init__(self, sign: float, quality: int = 95):
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.sign, self.quality = sign, quality

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        sizes = []
        for image in to_pil_images(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


class ToyModeCloseness:
    """The toy world's reward: exp(-|x - c_k|^2 / (2 width^2)) for 2-D points x and prompts 'mode k'."""

    def __init__(self, width: float = 1.5):
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = width

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] in (0, 1] of the toy world's 2-D points [B, 2], which it passes as ``images`` (Reward's name)."""
        points = torch.as_tensor(images, dtype=torch.float32).cpu()
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"toy_mode scores 2-D points [B, 2], got shape {tuple(points.shape)}")
        centres = toy.MODE_CENTERS[[toy.prompt_mode(prompt) for prompt in prompts]]
        return torch.exp(-((points - centres) ** 2).sum(1) / (2 * self.width**2))


def jpeg_compressibility(quality: int = 95) -> JpegSize:
    """DDPO's compressibility: minus the JPEG size in kB at ``quality`` (smaller files score higher)."""
    return JpegSize(-1.0, quality)


def jpeg_incompressibility(quality: int = 95) -> JpegSize:
    """DDPO's incompressibility: the JPEG size in kB at ``quality`` (detailed images score higher)."""
    return JpegSize(1.0, quality)


def mini_geneval(soft: bool = False) -> Any:
    """The mini world's GenEval: the fraction of the caption's constraints (objects, count, colour, position) held.

    soft: score detection confidences (the mean soft truth value of the constraints, smooth in the pixels) instead
    of pass/fail checks; options JSON {"soft": true}. A non-boolean raises ValueError.
    """
    from ..miniworld.geneval import MiniGenEval

    return MiniGenEval(soft=soft)


def mini_pickscore(path: str = "") -> Any:
    """The mini world's PickScore: logit_scale.exp() * cos(caption, image) of a small learned dual encoder.

    path: a mini_pickscore .safetensors file (``sfgrpo miniworld build --pickscore --out DIR`` writes one); empty:
    the committed weights. Options JSON {"path": "..."}; a missing or foreign file raises ValueError naming ``path``.
    Scale of the committed weights (sfgrpo_core.miniworld.pickscore): a true caption scores about 16.5, one with a
    colour, shape, count or relation changed about 10, an unrelated caption about 2.4 (held-out scenes).
    """
    from ..miniworld.pickscore import load_reward

    return load_reward(path)


register("jpeg_compressibility", jpeg_compressibility, replace=False)
register("jpeg_incompressibility", jpeg_incompressibility, replace=False)
register("toy_mode", ToyModeCloseness, replace=False)
register("mini_geneval", mini_geneval, replace=False)
register("mini_pickscore", mini_pickscore, replace=False)
