"""The one float-image -> uint8 quantizer: every image a reward sees (final samples, intermediate estimates, a
ComfyUI IMAGE on the Score node) goes through it, so the same pixels get the same score everywhere."""

from __future__ import annotations

import torch


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in 0..1 (any layout) -> uint8 on the CPU: round(clamp(x, 0, 1) * 255), as SaveImage and
    diffusers' VaeImageProcessor quantize."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
