"""The toy world: a small velocity MLP on a 2-D Gaussian mixture, to prove the RL loop in seconds on a CPU.

The base model is trained with the rectified-flow loss on 8 modes around a circle, ignoring the prompt: it puts
1/8 of its samples near each mode whatever it is asked. The prompt "mode k" asks for mode k, and the reward
``toy_mode`` is the closeness to that mode, so the base scores about 1/8 and a trained policy approaches 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from ..atomic import atomic_save_safetensors
from .base import register_backend

MODE_COUNT = 8
MODE_RADIUS = 2.0
MODE_STD = 0.2
MODE_CENTERS = torch.tensor(
    [[MODE_RADIUS * math.cos(2 * math.pi * k / MODE_COUNT), MODE_RADIUS * math.sin(2 * math.pi * k / MODE_COUNT)]
     for k in range(MODE_COUNT)]
)
_PROMPT = re.compile(r"^mode (\d+)$")


def prompt_mode(prompt: str) -> int:
    """The mode index k of the prompt 'mode k'. Raises ValueError naming the prompt otherwise."""
    match = _PROMPT.match(prompt.strip())
    if match is None or int(match.group(1)) >= MODE_COUNT:
        raise ValueError(f"toy world prompt {prompt!r}: write 'mode k' with k in 0..{MODE_COUNT - 1}")
    return int(match.group(1))


def sample_mixture(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 2] points from the 8-mode mixture."""
    modes = torch.randint(MODE_COUNT, (count,), generator=generator)
    return MODE_CENTERS[modes] + MODE_STD * torch.randn(count, 2, generator=generator)


class ToyVelocityNet(nn.Module):
    """v(x, sigma, condition): x [B, 2], sigma [B], condition one-hot [B, 8] -> [B, 2]."""

    frequencies: torch.Tensor  # [frequencies] angular frequencies of the sigma embedding, a non-persistent buffer

    def __init__(self, hidden: int = 128, frequencies: int = 8):
        super().__init__()
        self.register_buffer("frequencies", 2.0 ** torch.arange(frequencies, dtype=torch.float32) * math.pi,
                             persistent=False)
        self.input = nn.Linear(2 + 2 * frequencies + MODE_COUNT, hidden)
        self.hidden1 = nn.Linear(hidden, hidden)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        angles = sigma[:, None] * self.frequencies
        features = torch.cat([x, torch.sin(angles), torch.cos(angles), condition], dim=1)
        hidden = nn.functional.silu(self.input(features))
        hidden = nn.functional.silu(self.hidden1(hidden))
        hidden = nn.functional.silu(self.hidden2(hidden))
        return self.output(hidden)


def pretrain(steps: int = 1500, batch_size: int = 512, seed: int = 0) -> ToyVelocityNet:
    """Rectified-flow pretraining of the prompt-agnostic base (the condition is random, unrelated to the data).

    Enables gradients itself, so it also works when called under no_grad or inference mode.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _pretrain(steps, batch_size, seed)


def _pretrain(steps: int, batch_size: int, seed: int) -> ToyVelocityNet:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ToyVelocityNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        x0 = sample_mixture(batch_size, generator)
        x1 = torch.randn(batch_size, 2, generator=generator)
        t = torch.rand(batch_size, generator=generator)
        condition = nn.functional.one_hot(torch.randint(MODE_COUNT, (batch_size,), generator=generator),
                                          MODE_COUNT).float()
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = ((net(xt, t, condition) - (x1 - x0)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.train(False).requires_grad_(False)


class ToyWorld:
    """The toy world as a VelocityModel. ``decode`` is the identity: its rewards read the 2-D points."""

    # Typed as the VelocityModel protocol declares them (its attributes are settable, so the types must match).
    default_lora_targets: tuple[str, ...] = ("input", "hidden1", "hidden2", "output")
    fused_lora_parts: Mapping[str, tuple[int, ...]] = MappingProxyType({})
    sample_shape: tuple[int, ...] = (2,)
    default_prompts: tuple[str, ...] = ("mode 0", "mode 3")
    default_eval_prompts: tuple[str, ...] = ("mode 0", "mode 3")
    module: nn.Module

    def __init__(self, net: ToyVelocityNet, device: str = "cpu"):
        self.module = net.to(device).train(False)
        self.device = torch.device(device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.module(x, sigma, condition)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        modes = torch.tensor([prompt_mode(prompt) for prompt in prompts], dtype=torch.long)
        return nn.functional.one_hot(modes, MODE_COUNT).float().to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def build_toy_world(path: str = "", device: str = "cpu", cache_dir: str | Path | None = None, **_: object) -> ToyWorld:
    """Load the base from ``path`` (safetensors), else from ``cache_dir``'s cached copy, else pretrain it (~seconds)
    and cache it there."""
    from safetensors.torch import load_file

    net = ToyVelocityNet()
    cached = Path(cache_dir) / "toy_base.safetensors" if cache_dir else None
    source = Path(path) if path else cached
    if source is not None and source.is_file():
        net.load_state_dict(load_file(str(source)))
        net.train(False).requires_grad_(False)
    elif path:
        raise ValueError(f"model.path: {path!r} does not exist")
    else:
        net = pretrain()
        if cached is not None:
            atomic_save_safetensors(net.state_dict(), cached)
    return ToyWorld(net, device)


register_backend("toy", build_toy_world)
