"""Built-in health checks that flow_grpo's maintainers ask every user to run by hand.

1. on_policy_ratio: the importance ratio of freshly recorded transitions, recomputed with the same weights
   through the update's code path, is 1.
2. log_prob_parity: log-probs recomputed in shuffled micro-batches equal the rollout's (batch composition must
   not change a sample's log-prob).
3. zero_noise_is_ode: the training SDE with its noise set to 0 gives the ODE sampler's samples.
4. ode_matches_base: with a freshly attached (zero) LoRA the ODE samples equal the base model's (adapter off).
5. finite_update: one micro-batch of the update, forward and backward, keeps every module's output and gradient
   finite; where it does not, the first module that made a NaN or inf (training.nonfinite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import seeding
from ..algorithm import losses
from ..algorithm.sde import StepFunction, get_step_function
from ..config import Config
from ..lora.adapters import adapter_disabled, load_lora_state_dict
from ..models.base import VelocityModel
from .checkpoint import latest_checkpoint, load_checkpoint
from .nonfinite import non_finite_gradients, watch
from .rollout import Rollout, make_prompt_batch, rollout
from .trainer import Session, build_session, collect, step_function_for
from .update import recompute_steps


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status}  {self.name:<18} {self.value:.3e} (threshold {self.threshold:.0e})  {self.detail}"


@torch.no_grad()
def diagnose(config: Config, *, model: VelocityModel | None = None, tolerance: float = 1e-4) -> list[CheckResult]:
    """Run the checks on the configured model (with the run's latest LoRA, if the run folder holds one); the model,
    LoRA and rollout are built by the trainer's own ``build_session`` and ``collect``."""
    session = build_session(config, model=model)
    results = [_ode_matches_base(session, tolerance)]
    checkpoint = latest_checkpoint(session.run_dir)
    if checkpoint is not None:
        load_lora_state_dict(session.model.module, load_checkpoint(checkpoint).lora)
    model, step_fn = session.model, step_function_for(config)
    trajectories = collect(session, 0)
    batch, sigmas = trajectories.batch, session.sigmas
    members, steps = torch.nonzero(trajectories.active, as_tuple=True)

    same_batches = recompute_steps(model, trajectories, members, steps, step_fn)
    result = losses.grpo_loss(same_batches.log_prob, trajectories.log_probs[members, steps], torch.ones(len(members)),
                              clip_range=config.optim.clip_range)
    ratio = torch.exp(same_batches.log_prob - trajectories.log_probs[members, steps])
    deviation = float((ratio - 1).abs().max()) if len(members) else 0.0
    results.append(CheckResult("on_policy_ratio", deviation <= tolerance, deviation, tolerance,
                               f"max |ratio - 1| over {len(members)} active transitions; loss ratio mean "
                               f"{result.ratio_mean:.6f}, clip fraction {result.clip_fraction:.3f}"))

    order = torch.randperm(len(members), generator=seeding.generator(config.train.seed, "diagnose"))
    micro = max(1, min(config.optim.micro_batch_size or 7, len(members)))
    parity = 0.0
    for chunk in torch.split(order, micro):
        step = recompute_steps(model, trajectories, members[chunk], steps[chunk], step_fn)
        parity = max(parity, float((step.log_prob - trajectories.log_probs[members[chunk], steps[chunk]]).abs().max()))
    results.append(CheckResult("log_prob_parity", parity <= tolerance, parity, tolerance,
                               f"max |log p(update path, micro-batches of {micro}) - log p(rollout)|"))

    results.append(_finite_update(model, trajectories, members[order[:micro]], steps[order[:micro]], step_fn,
                                  config.optim.clip_range))

    zero_noise = get_step_function(config.sampler.sde, 0.0)
    sde_samples = rollout(model, batch, sigmas, zero_noise).final
    ode_samples = rollout(model, batch, sigmas, get_step_function("ode", 0.0)).final
    gap = float((sde_samples - ode_samples).abs().max())
    results.append(CheckResult("zero_noise_is_ode", gap <= tolerance, gap, tolerance,
                               f"max |{config.sampler.sde}(strength 0) - ode| of final samples"))
    return results


def _ode_matches_base(session: Session, tolerance: float) -> CheckResult:
    config, model = session.config, session.model
    prompts = list(session.prompts)[:4]
    batch = make_prompt_batch(model, prompts, 2, config.train.seed, 0, config.model.device)
    ode = get_step_function("ode", 0.0)
    with_adapter = rollout(model, batch, session.sigmas, ode).final
    with adapter_disabled(model.module):
        base = rollout(model, batch, session.sigmas, ode).final
    gap = float((with_adapter - base).abs().max())
    return CheckResult("ode_matches_base", gap <= tolerance, gap, tolerance,
                       "max |ODE samples with a fresh LoRA - base model (adapter off)|")


def _finite_update(model: VelocityModel, trajectories: Rollout, members: torch.Tensor, steps: torch.Tensor,
                   step_fn: StepFunction, clip_range: float) -> CheckResult:
    """The update's forward and backward on one micro-batch (unit advantages), every submodule watched."""
    if not len(members):
        return CheckResult("finite_update", True, 0.0, 0.0, "no active transitions to run")
    with torch.enable_grad(), watch(model.module) as found:
        step = recompute_steps(model, trajectories, members, steps, step_fn)
        loss = losses.grpo_loss(step.log_prob, trajectories.log_probs[members, steps].to(step.log_prob.device),
                                torch.ones(len(members), device=step.log_prob.device), clip_range=clip_range).loss
        loss.backward()
    bad_gradients = non_finite_gradients(model.module)
    model.module.zero_grad(set_to_none=True)
    first = found.first
    if first is None and not bad_gradients and bool(torch.isfinite(loss.detach())):
        return CheckResult("finite_update", True, 0.0, 0.0, f"every module's output and gradient finite over "
                                                             f"{len(members)} transitions")
    where = first.describe() if first is not None else "not inside a module (the log-prob or the loss itself)"
    return CheckResult("finite_update", False, float(len(found.sites) + len(bad_gradients)), 0.0,
                       f"loss {float(loss.detach()):.4g}; first non-finite value: {where}; "
                       f"{len(bad_gradients)} LoRA gradients non-finite")
