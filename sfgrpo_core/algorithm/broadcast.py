"""Broadcasting helpers shared by the samplers and the Tweedie estimates."""

from __future__ import annotations

import torch


def per_sample(value: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast a float, 0-d or [B] value (a sigma, say) to a float32 [B] tensor on ``device``."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device)
    if tensor.ndim == 0:
        return tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(f"sigma must be a float, a 0-d tensor or a [B]={batch} tensor, "
                         f"got shape {tuple(tensor.shape)}")
    return tensor


def expand_like(per_sample_value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts against ``x`` [B, ...]."""
    return per_sample_value.reshape(per_sample_value.shape + (1,) * (x.ndim - 1))
