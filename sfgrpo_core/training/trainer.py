"""The training loop: rollout -> rewards -> advantages -> update -> log -> checkpoint."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import models, rewards, seeding
from ..algorithm.advantages import zero_variance_fraction
from ..algorithm.schedule import flow_sigmas
from ..algorithm.sde import get_step_function
from ..algorithm.tweedie import x0_estimate
from ..atomic import atomic_write_text
from ..config import RESUMABLE_CHANGES, Config, ConfigError, config_differences
from ..lora.adapters import attach_lora, load_lora_state_dict, lora_state_dict, write_lora
from ..models.base import VelocityModel
from .checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from .credit import CREDIT_METHODS, Credit, gather_scores
from .distributed import SINGLE, Team, full_tensors, join, shard, sharded_optimizer_state
from .figures import reward_curve_figure, save_png
from .lr_schedule import LR_SCHEDULES
from .metrics import CallCounter, MetricsLog
from .rollout import Rollout, StepCallback, choose_prompts, independent_noise, make_prompt_batch, rollout
from .step_rewards import BatchSizes, decode_in_batches, score_decoded
from .trackers import Trackers
from .update import UpdateStats, update_policy


@dataclass
class TrainHooks:
    """Optional callbacks for front ends (the CLI's progress bar, the ComfyUI node's previews and cancel).

    A hook may raise to cancel: the exception propagates and the last checkpoint stays as it was.
    """

    on_rollout_step: StepCallback | None = None
    on_iteration: Callable[[dict[str, Any]], None] | None = None


@dataclass
class Session:
    """Everything one training run holds."""

    config: Config
    model: VelocityModel
    reward: rewards.Reward
    optimizer: torch.optim.Optimizer
    run_dir: Path
    lora_targets: tuple[str, ...]
    start_iteration: int = 0
    prompts: tuple[str, ...] = ()
    eval_prompts: tuple[str, ...] = ()
    sigmas: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    team: Team = SINGLE
    sharded_blocks: int = 0  # transformer blocks FSDP shards on their own (train.sharding fsdp)


@dataclass(frozen=True)
class TrainResult:
    """What a run leaves: its folder, the LoRA file, the metrics records, the trained model (adapters attached) and
    the reward curve as a uint8 [H, W, 3] image (also saved as reward_curve.png)."""

    run_dir: Path
    lora_path: Path
    records: list[dict[str, Any]]
    model: VelocityModel
    reward_curve: np.ndarray


class PhaseTimer:
    """Wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def build_session(config: Config, *, model: VelocityModel | None = None,
                  reward: rewards.Reward | None = None, team: Team = SINGLE) -> Session:
    """Build (or take) the model and reward, attach a fresh LoRA, shard the model when the team is sharded
    (train.sharding) and make the optimizer; writes nothing.

    A given ``reward`` replaces the one config.train.reward names (front ends that loaded it already).
    """
    run_dir = Path(config.train.output_dir)
    if model is None:
        model = models.build(config.model.name, path=config.model.path, device=config.model.device,
                             cache_dir=run_dir if run_dir.is_dir() else None, **config.model_kwargs)
    targets = config.lora.target_modules or model.default_lora_targets
    parameters = attach_lora(model.module, rank=config.lora.rank, alpha=config.lora.alpha, target_modules=targets,
                             seed=seeding.derive_seed(config.train.seed, "lora"), fused=model.fused_lora_parts)
    blocks = 0
    if team.sharded:
        if model.fused_lora_parts:
            raise ConfigError("train.sharding: fsdp cannot shard a model with fused LoRA layers (a ComfyUI MODEL); "
                              "use train.sharding none")
        blocks = shard(model.module, team)  # the parameters are DTensors from here on, in the same order
        parameters = [parameter for parameter in model.module.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    session = Session(
        config=config, model=model, optimizer=optimizer, run_dir=run_dir, lora_targets=tuple(targets),
        reward=reward if reward is not None else rewards.load(config.train.reward, **config.reward_kwargs),
        prompts=config.train.prompts or model.default_prompts,
        eval_prompts=config.train.eval_prompts or model.default_eval_prompts,
        sigmas=flow_sigmas(config.sampler.steps, config.sampler.shift),
        sharded_blocks=blocks,
    )
    model.encode_prompts(list(session.prompts) + list(session.eval_prompts))  # fail now on a bad prompt
    return session


def restore(session: Session, checkpoint: Checkpoint) -> None:
    """Continue from ``checkpoint``: its LoRA weights, optimizer state and iteration.

    Raises:
        ConfigError: naming the fields that differ from the checkpoint's config and cannot change on resume.
    """
    changed = [name for name in config_differences(checkpoint.config, session.config)
               if name not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"cannot resume with changed {', '.join(changed)}: the checkpoint was trained with "
                          "other values; restore them or start a new run in another output_dir")
    load_lora_state_dict(session.model.module, checkpoint.lora)
    session.optimizer.load_state_dict(sharded_optimizer_state(checkpoint.optimizer_state, session.optimizer))
    session.start_iteration = checkpoint.iteration


def prepare(config: Config, *, model: VelocityModel | None = None, reward: rewards.Reward | None = None,
            resume: bool = False) -> Session:
    """The run's session: checks the run folder, builds the session, restores the latest checkpoint if resuming,
    and writes config.json.

    Raises:
        ConfigError: resuming without a checkpoint, with changed fields that cannot change, or starting over an
            existing run.
    """
    run_dir = Path(config.train.output_dir)
    team = join(config.model.device, config.train.distributed_timeout, config.train.sharding)
    if config.train.groups_per_iteration % team.size:
        raise ConfigError(f"train.groups_per_iteration: {config.train.groups_per_iteration} groups cannot be split "
                          f"evenly over {team.size} processes; use a multiple of {team.size}")
    checkpoint_path = latest_checkpoint(run_dir)
    if resume and checkpoint_path is None:
        raise ConfigError(f"train.output_dir: {str(run_dir)!r} holds no checkpoint to resume from; drop --resume "
                          "to start a new run")
    if not resume and checkpoint_path is not None:
        raise ConfigError(f"train.output_dir: {str(run_dir)!r} already holds a run; pass --resume to continue it "
                          "or choose another output_dir")
    team.barrier()  # every process has looked at the run folder before the main one writes into it
    if team.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    team.barrier()
    session = build_session(config, model=model, reward=reward, team=team)
    session.team = team
    if resume and checkpoint_path is not None:
        restore(session, load_checkpoint(checkpoint_path))
    if team.is_main:
        atomic_write_text(run_dir / "config.json", _json(config.to_dict()))
    return session


def collect(session: Session, iteration: int, hooks: TrainHooks | None = None) -> Rollout:
    """Rollout phase: this iteration's prompt groups sampled with the training SDE."""
    config = session.config
    group_prompts = choose_prompts(session.prompts, config.train.groups_per_iteration, config.train.seed, iteration)
    noise = None  # shared by each group
    if config.initial_noise == "independent":
        noise = independent_noise(session.model.sample_shape, len(group_prompts), config.train.group_size,
                                  config.train.seed, iteration)
    batch = make_prompt_batch(session.model, group_prompts, config.train.group_size, config.train.seed, iteration,
                              device=config.model.device, initial_noise=noise)
    rows = session.team.rows(len(batch.prompts))  # the whole batch is drawn alike everywhere; each process its rows
    return rollout(session.model, batch.rows(rows.start, rows.stop), session.sigmas, step_function_for(config),
                   train_last_step=config.sampler.train_last_step, min_train_std=config.sampler.min_train_std,
                   callback=hooks.on_rollout_step if hooks else None, chunk_size=config.train.sample_batch_size)


def step_function_for(config: Config):
    """The configured sampler with its strength bound (noise_level for flow_grpo, eta otherwise)."""
    strength = config.sampler.noise_level if config.sampler.sde == "flow_grpo" else config.sampler.eta
    return get_step_function(config.sampler.sde, strength)


def assign_credit(session: Session, trajectories: Rollout) -> Credit:
    """Rewards and advantages phase, by the configured credit method."""
    method = CREDIT_METHODS[session.config.credit.method]
    config = session.config
    return method(session.model, trajectories, session.reward, config.credit,
                  BatchSizes(samples=config.train.sample_batch_size, rewards=config.train.reward_batch_size),
                  session.team)


def update(session: Session, trajectories: Rollout, credit: Credit, iteration: int) -> UpdateStats:
    """Update phase: the clipped GRPO loss over active transitions, at the iteration's scheduled lr."""
    optim = session.config.optim
    span = optim.lr_decay_iterations or session.config.train.iterations
    lr = LR_SCHEDULES[optim.lr_schedule](optim.lr, iteration, span, optim.lr_final_ratio)
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    generator = seeding.generator(session.config.train.seed, iteration, "shuffle")
    advantages = credit.advantages.to(trajectories.states.device)
    return update_policy(session.model, session.optimizer, trajectories, advantages, session.config.optim,
                         step_function_for(session.config), generator, session.team)


@dataclass(frozen=True)
class Evaluation:
    """Held-out rewards of ODE samples: ``scores`` [n] (NaN = missing) of ``prompts`` (n texts), each component's [n]
    scores for a reward made of several, and each judge's."""

    scores: torch.Tensor
    prompts: list[str]
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    judged: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each judge's [n] scores of the same samples (``evaluate(judges=...)``)."""
    preview: Any = None
    """The first samples decoded (``evaluate(preview=...)``; uint8 [k, H, W, 3] for an image model), or None."""

    @property
    def mean(self) -> float:
        return _nanmean(self.scores)


@torch.no_grad()
def evaluate(session: Session, judges: dict[str, rewards.Reward] | None = None, preview: int = 0) -> Evaluation:
    """Held-out rewards of ODE samples, ``train.eval_samples`` per eval prompt (fixed seeds, so successive
    evaluations differ only by the policy). ``judges`` (name -> reward) score the same samples too: a gold judge
    beside a proxy reward, say. ``preview`` > 0 keeps that many of the samples decoded (``Evaluation.preview``)."""
    config = session.config
    sigmas = flow_sigmas(config.train.eval_steps, config.sampler.shift)
    count = len(session.eval_prompts) * config.train.eval_samples
    # Every eval sample gets its own initial noise: evaluation measures the policy, not one noise draw.
    noise = torch.randn((count, *session.model.sample_shape), generator=seeding.generator(config.train.seed, "eval"))
    batch = make_prompt_batch(session.model, session.eval_prompts, config.train.eval_samples, config.train.seed,
                              -1, device=config.model.device, initial_noise=noise)
    team = session.team
    rows = team.rows(count) if count % team.size == 0 else slice(0, count)  # else every process scores them all
    mine = batch.rows(rows.start, rows.stop)
    samples = rollout(session.model, mine, sigmas, get_step_function("ode", 0.0),
                      chunk_size=config.train.sample_batch_size).final
    batch_size = config.train.reward_batch_size
    images = decode_in_batches(session.model, samples, batch_size)  # once for the reward, the judges, the preview
    scores = score_decoded(session.reward, images, list(mine.prompts), batch_size)
    judged = {name: score_decoded(judge, images, list(mine.prompts), batch_size).values
              for name, judge in (judges or {}).items()}
    if rows.stop - rows.start < count:
        scores = gather_scores(team, scores)
        judged = {name: team.gather_rows(values) for name, values in judged.items()}
    shown = images[:preview] if preview else None
    return Evaluation(scores=scores.values, prompts=list(batch.prompts), components=scores.components, judged=judged,
                      preview=shown)


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf (latents, loss or LoRA weights): the run stops before anything is saved."""


def require_finite(iteration: int, trajectories: Rollout, stats: UpdateStats, model: VelocityModel,
                   team: Team = SINGLE) -> None:
    """Stop the run (NonFiniteError) when the rollout's latents, the loss or the LoRA weights are not finite, so a
    diverged run never writes a checkpoint or a LoRA and never reports success; the last checkpoint stays."""
    advice = ("the last good checkpoint is kept; lower optim.lr, keep optim.grad_clip on, or run the model in "
              "float32, then resume (for a headless run, `sfgrpo diagnose` with its config names the module that "
              "makes the NaN)")
    if not team.all_true(bool(torch.isfinite(trajectories.states).all())):  # every process stops, not only one
        raise NonFiniteError(f"iteration {iteration}: the rollout produced non-finite latents (NaN/inf); {advice}")
    if not math.isfinite(stats.loss):
        raise NonFiniteError(f"iteration {iteration}: the loss is {stats.loss}; {advice}")
    # The trainable (LoRA) parameters themselves, no copy; a sharded model's own shards, agreed across processes.
    bad = [name for name, parameter in model.module.named_parameters() if parameter.requires_grad
           and not bool(torch.isfinite(_local(parameter.detach())).all())]
    if not team.all_true(not bad):
        raise NonFiniteError(f"iteration {iteration}: LoRA weights became non-finite "
                             f"({bad[0] + ', ' + str(len(bad)) + ' here' if bad else 'on another process'}); {advice}")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's shard on this process; any other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def iteration_metrics(iteration: int, session: Session, trajectories: Rollout, credit: Credit, stats: UpdateStats,
                      seconds: dict[str, float]) -> dict[str, Any]:
    """What a user needs to debug RL, for one iteration."""
    final = credit.final_rewards
    finite_final = final[torch.isfinite(final)]
    if not finite_final.numel():
        raise rewards.RewardError(f"iteration {iteration}: the reward could not score any of the {len(final)} final "
                                  f"images (all missing); stopping. The last checkpoint is kept: fix the reward "
                                  f"(or its server) and resume.")
    record: dict[str, Any] = {
        "iteration": iteration,
        "samples_seen": (iteration + 1) * len(final),
        "reward_mean": _nanmean(final),
        "reward_std": float(finite_final.std(correction=0)) if finite_final.numel() > 1 else 0.0,
        "reward_missing": credit.missing,
        "reward_calls": credit.reward_calls,
        "zero_std_ratio": zero_variance_fraction(final, credit.group_ids),
        "active_transitions": stats.transitions,
        "loss": stats.loss, "ratio_mean": stats.ratio_mean, "clip_fraction": stats.clip_fraction,
        "approx_kl": stats.approx_kl, "kl_penalty": stats.kl_penalty, "grad_norm": stats.grad_norm,
        "lr": session.optimizer.param_groups[0]["lr"], "world_size": session.team.size,
    }
    if credit.components:
        record["reward_components"] = {name: _nanmean(values) for name, values in credit.final_components.items()}
        record["reward_components_missing"] = {name: int(torch.isnan(values).sum())
                                               for name, values in credit.final_components.items()}
    if credit.gains is not None:
        # None where no reward of that step was needed (scored_states), e.g. r_0 behind a deterministic first step
        record["step_reward_mean"] = [_nanmean(credit.rewards[:, k]) if credit.scored[:, k].any() else None
                                      for k in range(credit.rewards.shape[1])]
        record["gain_abs_mean"] = [_nanmean(credit.gains[:, k].abs())
                                   if (credit.scored[:, k] & credit.scored[:, k + 1]).any() else None
                                   for k in range(credit.gains.shape[1])]
    record.update({f"seconds_{phase}": value for phase, value in seconds.items()})
    return record


def train(config: Config, *, model: VelocityModel | None = None, reward: rewards.Reward | None = None,
          resume: bool = False, progress: bool = False, hooks: TrainHooks | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns the run folder, the LoRA file, the metrics and the model."""
    hooks = hooks or TrainHooks()
    session = prepare(config, model=model, reward=reward, resume=resume)
    team, main = session.team, session.team.is_main
    counter = CallCounter(session.model)
    session.model = counter
    log = MetricsLog(session.run_dir / "metrics.jsonl", resume_iteration=session.start_iteration, write=main)
    elapsed = log.records[-1].get("seconds_elapsed", 0.0) if log.records else 0.0
    iterations = range(session.start_iteration, config.train.iterations)
    if progress and main:
        print(batch_arithmetic(config, team.size), file=sys.stderr, flush=True)
        if team.sharded:
            print(f"sfgrpo: FSDP shards the model over the {team.size} processes: {session.sharded_blocks} "
                  "transformer blocks one by one, then the rest", file=sys.stderr, flush=True)
    bar = _progress_bar(iterations, progress and main)
    trackers = Trackers(config.train.trackers if main else "none", session.run_dir, session.run_dir.name)
    trackers.log_config(config.to_dict())
    preview = PREVIEW_SAMPLES if trackers.trackers else 0
    for iteration in bar:
        timer = PhaseTimer()
        with timer("eval"):
            evaluation = evaluate(session, preview=preview) if _eval_due(config, iteration) else None
        counter.take()  # the work of the evaluation is not the iteration's
        with timer("rollout"):
            trajectories = collect(session, iteration, hooks)
        with timer("rewards"):
            credit = assign_credit(session, trajectories)
        with timer("update"):
            stats = update(session, trajectories, credit, iteration)
        require_finite(iteration, trajectories, stats, session.model, session.team)
        elapsed += sum(timer.seconds.values()) - timer.seconds["eval"]
        record = iteration_metrics(iteration, session, trajectories, credit, stats, timer.seconds)
        record.update(_work_counts(counter, team), seconds_elapsed=elapsed, **_evaluation_metrics(evaluation))
        log.log(record)
        track(trackers, session, record, trajectories, evaluation)
        if hooks.on_iteration and main:
            hooks.on_iteration(record)
        if progress and main:
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{stats.approx_kl:.2e}")
        checkpoint_if_due(session, iteration + 1)
    if config.train.eval_every and session.start_iteration < config.train.iterations:
        final_evaluation = evaluate(session, preview=preview)  # a collective: every process takes part
        final_record = {"iteration": config.train.iterations, "eval_reward_mean": final_evaluation.mean,
                        "seconds_elapsed": elapsed, "world_size": team.size}
        log.log(final_record)
        track(trackers, session, final_record, None, final_evaluation)
    trackers.close()
    lora_path = session.run_dir / "lora.safetensors"
    curve = reward_curve_figure(log.records, title=f"{config.train.reward}: credit {config.credit.method}, sde "
                                                   f"{config.sampler.sde}, seed {config.train.seed}")
    lora = lora_state_dict(session.model.module)  # every process: a collective when sharded
    if main:
        write_lora(lora_path, lora, rank=config.lora.rank, alpha=config.lora.alpha,
                   target_modules=session.lora_targets)
        _export_lora(session.model, lora_path)
        save_png(curve, session.run_dir / "reward_curve.png")
    team.barrier()
    return TrainResult(run_dir=session.run_dir, lora_path=lora_path, records=log.records, model=counter.model,
                       reward_curve=curve)


PREVIEW_SAMPLES = 8  # held-out samples a tracker shows at each evaluation


def track(trackers: Trackers, session: Session, record: dict[str, Any], trajectories: Rollout | None,
          evaluation: Evaluation | None) -> None:
    """Send an iteration's record to the trackers and, at an evaluation, its images: the held-out samples in a row
    and the x0 estimates x_k - t_k v_k along the iteration's first trajectory, then its final sample (image models
    only: a backend whose decode gives no uint8 [B, H, W, 3] images has none to show)."""
    if not trackers.trackers:
        return
    trackers.log_record(record, record["iteration"])
    if evaluation is None:
        return
    if _is_image_batch(evaluation.preview):
        trackers.log_image("eval/samples", _row(evaluation.preview), record["iteration"])
    if trajectories is not None:
        estimates = x0_estimate(trajectories.states[:1, :-1].flatten(0, 1), trajectories.velocities[:1].flatten(0, 1),
                                trajectories.sigmas[:-1].to(trajectories.states.device))
        strip = session.model.decode(torch.cat([estimates, trajectories.final[:1].float()]))
        if _is_image_batch(strip):
            trackers.log_image("rollout/x0_estimates", _row(strip), record["iteration"])


def _is_image_batch(images: Any) -> bool:
    return (isinstance(images, torch.Tensor) and images.ndim == 4 and images.dtype == torch.uint8
            and images.shape[-1] == 3)


def _row(images: torch.Tensor, gap: int = 2) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 [H, B W + (B - 1) gap, 3] image, the images side by side."""
    count, height, width, _ = images.shape
    row = np.full((height, count * width + (count - 1) * gap, 3), 24, dtype=np.uint8)
    for index, image in enumerate(images.cpu().numpy()):
        row[:, index * (width + gap) : index * (width + gap) + width] = image
    return row


def _work_counts(counter: CallCounter, team: Team) -> dict[str, int]:
    """The model calls (and the like) of every process since the last ``take``."""
    return {name: int(team.sum(torch.tensor([float(count)])).item()) for name, count in counter.take().items()}


def _evaluation_metrics(evaluation: Evaluation | None) -> dict[str, Any]:
    if evaluation is None:
        return {}
    record: dict[str, Any] = {"eval_reward_mean": evaluation.mean}
    if evaluation.components:
        record["eval_reward_components"] = {name: _nanmean(values) for name, values in evaluation.components.items()}
    return record


def checkpoint_if_due(session: Session, done: int) -> None:
    """Checkpoint after ``done`` iterations when it is due (every ``checkpoint_every``, and the last): every process
    gathers the LoRA and the optimizer state (a collective when sharded), the main one writes."""
    config = session.config
    if done % config.train.checkpoint_every and done != config.train.iterations:
        return
    lora, optimizer_state = lora_state_dict(session.model.module), full_tensors(session.optimizer.state_dict())
    if session.team.is_main:
        save_checkpoint(session.run_dir, done, config, lora, optimizer_state, keep=config.train.keep_checkpoints)
    session.team.barrier()


def batch_arithmetic(config: Config, processes: int) -> str:
    """The batch of one iteration spelled out (printed when a run starts)."""
    groups, size = config.train.groups_per_iteration, config.train.group_size
    line = f"sfgrpo: {groups} prompt groups x {size} members = {groups * size} trajectories per iteration"
    if processes > 1:
        line += (f", over {processes} processes ({groups // processes} groups = {groups // processes * size} "
                 f"trajectories each)")
    return line


def _export_lora(model: VelocityModel, lora_path: Path) -> None:
    """Also write the LoRA in the formats the backend knows (diffusers, ComfyUI); a failure there must not lose
    the run, whose peft-format LoRA is already saved."""
    export = getattr(model, "export_lora", None)
    if export is None:
        return
    try:
        export(lora_path)
    except ValueError as error:
        warnings.warn(f"LoRA export skipped: {error}", stacklevel=2)


def _eval_due(config: Config, iteration: int) -> bool:
    return config.train.eval_every > 0 and iteration % config.train.eval_every == 0


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def _progress_bar(iterations: range, enabled: bool):
    if not enabled:
        return _Silent(iterations)
    from tqdm import tqdm

    return tqdm(iterations, initial=iterations.start, total=iterations.stop, desc="sfgrpo train", unit="it")


class _Silent:
    def __init__(self, iterable: range) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **_: Any) -> None:
        pass
