"""The mini world's tiny text encoder: word embeddings + a small transformer, giving SD3's conditioning pair.

SD3 is conditioned on per-token context [B, L, joint_dim] and a pooled vector [B, pooled_dim]. The empty prompt
encodes to zeros for both, exactly what ComfyUI's ConditioningZeroOut produces, so the unconditional branch of
classifier-free guidance is the same inside and outside ComfyUI.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .scenes import CATEGORIES, all_specs, caption

PAD = "<pad>"
MAX_TOKENS = 12


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Every word of every caption template, sorted, after the padding token (index 0)."""
    words = {word for category in CATEGORIES for spec in all_specs(category) for word in caption(spec).split()}
    return (PAD, *sorted(words))


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """Word indices [B, MAX_TOKENS] (0 = padding). Raises ValueError naming an unknown word or a too-long prompt."""
    index = {word: position for position, word in enumerate(vocabulary())}
    rows = []
    for prompt in prompts:
        words = prompt.lower().split()
        unknown = [word for word in words if word not in index]
        if unknown:
            raise ValueError(f"mini-world prompt {prompt!r}: unknown word {unknown[0]!r}; the mini world knows "
                             f"{', '.join(vocabulary()[1:])}")
        if len(words) > MAX_TOKENS:
            raise ValueError(f"mini-world prompt {prompt!r} has {len(words)} words; at most {MAX_TOKENS}")
        rows.append([index[word] for word in words] + [0] * (MAX_TOKENS - len(words)))
    return torch.tensor(rows, dtype=torch.long)


class MiniTextEncoder(nn.Module):
    """tokens [B, L] -> (context [B, L, joint_dim], pooled [B, pooled_dim]); all-padding rows give zeros."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, joint_dim: int = 64, pooled_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "layers": layers, "heads": heads, "joint_dim": joint_dim,
                       "pooled_dim": pooled_dim}
        self.embedding = nn.Embedding(len(vocabulary()), width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.context_projection = nn.Linear(width, joint_dim)
        self.pooled_projection = nn.Linear(width, pooled_dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padding = tokens == 0
        empty = padding.all(dim=1)
        # An empty prompt attends to nothing; unmask its first slot to keep attention finite, then zero it below.
        attend_mask = padding.clone()
        attend_mask[empty, 0] = False
        hidden = self.encoder(self.embedding(tokens) + self.position, src_key_padding_mask=attend_mask)
        keep = (~padding).unsqueeze(-1).float()
        context = self.context_projection(hidden) * keep
        pooled = self.pooled_projection((hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0))
        return context, pooled * (~empty).unsqueeze(-1).float()

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """SD3 conditioning of the prompts: {"context": [B, L, joint_dim], "pooled": [B, pooled_dim]}."""
        device = self.position.device
        context, pooled = self(tokenize(prompts).to(device))
        return {"context": context, "pooled": pooled}


def load_text_encoder(path: str | Path) -> MiniTextEncoder:
    """A MiniTextEncoder from a safetensors file whose metadata holds its config (as the build writes it); float32,
    frozen, in inference layout (train(False))."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    encoder = MiniTextEncoder(**config)
    encoder.load_state_dict(load_file(str(path)))
    return encoder.train(False).requires_grad_(False)
