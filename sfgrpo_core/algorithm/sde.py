"""Stochastic samplers for rectified-flow models, with exact Gaussian log-probabilities.

Conventions (see docs/algorithm.md): x_t = (1 - t) x0 + t x1, t = sigma in [0, 1], t = 1 is noise,
the model predicts the velocity v = x1 - x0, and one step goes from ``sigma`` (t) to ``sigma_next`` (s < t).

Each sampler is a small pure function ``(x, velocity, t, s, strength) -> (mean, std)`` of one Gaussian step (its
*policy*); ``sde_step`` is the one place that draws (or takes) the next sample and scores it. Nothing keeps state:
(sigma, sigma_next) are explicit, so the log-probability of any batch of recorded transitions can be recomputed later
(the policy-gradient update does exactly that). All math is float32 whatever the input dtype. ``sigma`` and
``sigma_next`` may be Python floats, 0-d tensors or [B] tensors.

Compared with flow_grpo (yifan123/flow_grpo, ``sde_step_with_logprob``):
- the same Flow-GRPO SDE (``flow_grpo_policy``), with t = 1 handled through the next grid value as flow_grpo does;
- the paper's DDIM-inspired SDE (``ddim_policy``) is new;
- ``cps_policy`` keeps flow_grpo's CPS mean but is scored with the full Gaussian density (flow_grpo drops the
  1 / (2 sigma^2) factor there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .broadcast import expand_like, per_sample

# Steps whose noise std is below this are deterministic for all practical purposes: their log-density is not a
# usable policy (it explodes as 1/std^2), so they are masked out of the loss (docs/algorithm.md section 2, ours).
MIN_TRAINABLE_STD = 1e-4

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class SDEStep:
    """Result of one sampler step.

    Attributes:
        prev_sample: x at ``sigma_next``, shape of ``x``, float32 (the drawn sample, or the given ``prev_sample``).
        mean: the Gaussian policy mean, shape of ``x``, float32.
        std: the policy's noise standard deviation per sample, [B], float32 (0 for deterministic steps).
        log_prob: log-density of ``prev_sample`` averaged over the non-batch elements, [B], float32; 0 where
            ``std`` is below ``MIN_TRAINABLE_STD`` (see ``trainable``).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor

    @property
    def trainable(self) -> torch.Tensor:
        """[B] bool: True where the step is stochastic enough to carry a policy gradient."""
        return trainable_mask(self.std)


def trainable_mask(std: torch.Tensor) -> torch.Tensor:
    """[B] bool mask of steps whose noise std is at least ``MIN_TRAINABLE_STD``."""
    return std >= MIN_TRAINABLE_STD


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(sample; mean, std^2 I), averaged (not summed) over the non-batch elements.

    Args:
        sample, mean: [B, ...] tensors.
        std: [B] noise standard deviation. Entries below ``MIN_TRAINABLE_STD`` give log_prob 0 (masked steps),
            never NaN or inf, and carry no gradient.

    Returns:
        [B] float32.
    """
    trainable = trainable_mask(std)
    safe_std = expand_like(torch.where(trainable, std, torch.ones_like(std)), sample)
    element = -((sample.float() - mean.float()) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = element.flatten(1).mean(dim=1)
    return torch.where(trainable, log_prob, torch.zeros_like(log_prob))


StepPolicy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                      tuple[torch.Tensor, torch.Tensor]]
"""policy(x, velocity, t [B], s [B], strength) -> (mean [B, ...], std [B]): one Gaussian step from t to s < t, all
float32. ``strength`` is the sampler's noise knob (eta, or the noise level a)."""


def flow_grpo_policy(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                     noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE (docs/algorithm.md section 1), strength = the noise level a >= 0.

    std_t = a sqrt(t / (1 - t)) (with 1 - s in the denominator at t = 1),
    mean = x + (s - t) [v + std_t^2 / (2 t) (x + (1 - t) v)],  step std = std_t sqrt(t - s).
    a = 0 is the Euler ODE step x + (s - t) v.
    """
    # At t = 1 the SDE's std is infinite; flow_grpo evaluates the denominator at the next grid value instead.
    denominator = torch.where(t >= 1.0, 1.0 - s, 1.0 - t)
    std_t = noise_level * torch.sqrt(t / denominator)
    tb, sb, std_b = expand_like(t, x), expand_like(s, x), expand_like(std_t, x)
    mean = x + (sb - tb) * (velocity + std_b**2 / (2 * tb) * (x + (1 - tb) * velocity))
    return mean, std_t * torch.sqrt(t - s)


def _ddim_mean(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, s: torch.Tensor, std: torch.Tensor):
    """mean = (1 - s) x0_hat + sqrt(s^2 - sigma_t^2) x1_hat (docs/algorithm.md section 2)."""
    tb, sb = expand_like(t, x), expand_like(s, x)
    x0_hat = x - tb * velocity
    x1_hat = x + (1 - tb) * velocity
    direction = expand_like(torch.sqrt(torch.clamp(s**2 - std**2, min=0.0)), x)
    return (1 - sb) * x0_hat + direction * x1_hat


def ddim_policy(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's DDIM-inspired SDE (Stepwise-Flow-GRPO, docs/algorithm.md section 2), strength = eta in [0, 1].

    sigma_t = eta s sqrt(1 - t); mean = (1 - s) x0_hat + sqrt(s^2 - sigma_t^2) x1_hat; std = sigma_t.
    sigma_t is 0 at t = 1 and at s = 0: those steps are deterministic (std 0, log_prob 0, masked in the loss).
    eta = 0 is the Euler ODE step. A few-step sampler: with many steps it becomes under-dispersed.
    """
    std = eta * s * torch.sqrt(torch.clamp(1 - t, min=0.0))
    return _ddim_mean(x, velocity, t, s, std), std


def cps_policy(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
               eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """flow_grpo's coefficient-preserving sampler: the DDIM mean with sigma = s sin(eta pi / 2)."""
    std = s * math.sin(eta * math.pi / 2)
    return _ddim_mean(x, velocity, t, s, std), std


def ode_policy(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
               strength: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic Euler step x + (s - t) v (std 0: never trainable); ``strength`` is ignored."""
    return x + expand_like(s - t, x) * velocity, torch.zeros_like(t)


SDES: dict[str, StepPolicy] = {"ddim": ddim_policy, "flow_grpo": flow_grpo_policy, "cps": cps_policy,
                               "ode": ode_policy}
SDE_NAMES = tuple(SDES)


def sde_step(
    name: str,
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    strength: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> SDEStep:
    """One step of the sampler ``name`` from ``sigma`` to ``sigma_next``: the policy's Gaussian, a sample from it
    (or the given one) and its log-density.

    Args:
        name: one of ``SDE_NAMES``.
        x: current sample [B, ...] at ``sigma``.
        velocity: model velocity v = x1 - x0 at (x, sigma), same shape.
        sigma, sigma_next: current and next noise level (t > s), float / 0-d / [B].
        strength: eta for ddim and cps, the noise level a for flow_grpo; ignored by ode.
        noise: optional standard normal noise (shape of x) to use instead of drawing it.
        prev_sample: optional recorded next sample to score instead of drawing one.

    Raises:
        ValueError: for an unknown name, or a ``prev_sample`` of the wrong shape.
    """
    policy = _policy(name)
    x, velocity = x.float(), velocity.float()
    t = per_sample(sigma, x.shape[0], x.device)
    s = per_sample(sigma_next, x.shape[0], x.device)
    mean, std = policy(x, velocity, t, s, strength)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean) if bool((std > 0).any()) else torch.zeros_like(mean)
        prev_sample = mean + expand_like(std, mean) * noise.float()
    else:
        if prev_sample.shape != mean.shape:
            raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}, expected {tuple(mean.shape)}")
        prev_sample = prev_sample.float()
    return SDEStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=gaussian_log_prob(prev_sample, mean, std))


StepFunction = Callable[..., SDEStep]
"""fn(x, velocity, sigma, sigma_next, *, noise=None, prev_sample=None) -> SDEStep: ``sde_step`` with its sampler and
strength bound."""


def get_step_function(name: str, strength: float) -> StepFunction:
    """The sampler called ``name`` with its noise strength bound (eta for ddim/cps, noise_level for flow_grpo).

    Raises:
        ValueError: for an unknown name, listing the valid ones, or a strength that is NaN, inf or negative.
    """
    _policy(name)
    if not math.isfinite(strength) or strength < 0:
        # NaN passes every < and > bound check, and would make every latent NaN: refuse it by name.
        raise ValueError(f"strength: must be a finite number >= 0, got {strength!r}")
    return functools.partial(sde_step, name, strength=strength)


def _policy(name: str) -> StepPolicy:
    if name not in SDES:
        raise ValueError(f"unknown sde {name!r}: choose one of {', '.join(SDE_NAMES)}")
    return SDES[name]
