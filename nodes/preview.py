"""SFGRPOTweediePreview: what each denoising step "means" — the clean image every step of a trajectory points at.

Stepwise-Flow-GRPO credits each step with the reward gain of its clean estimate (docs/algorithm.md section 4).
This node samples with the trainer's own SDE step (nodes/sampler.py ``sample_sfgrpo``, through ComfyUI's SamplerCustom
machinery: noise, conds, CFG, latent in/out) and, at every step, completes the current x_k to a clean estimate with
``sfgrpo_core.algorithm.tweedie.complete`` through the very guided denoiser the sampler uses. The estimates are
decoded with the VAE and, when a reward is connected, scored and drawn as the paper's Figure 1
(``figures.step_reward_figure``), which the node also shows on itself.
"""

from __future__ import annotations

import functools
import itertools

import torch
from comfy_api.latest import io, ui

from ..sfgrpo_core.algorithm.broadcast import expand_like
from ..sfgrpo_core.algorithm.sde import SDE_NAMES
from ..sfgrpo_core.algorithm.tweedie import complete
from ..sfgrpo_core.training.figures import message_image, step_reward_figure
from .comfy_model import patched_model_sampling
from .rewards import score_images
from .sampler import DEFAULT_ETA, STRENGTH_TOOLTIP, require_flow_sampling, sample_sfgrpo
from .types import CATEGORY as PACK_CATEGORY
from .types import LoadedReward, Reward, image_tensor, require_finite

CATEGORY = f"{PACK_CATEGORY}/preview"
NO_REWARD_TEXT = "No reward is connected.\nConnect Load Reward to plot the reward\nof each step's clean estimate."


def clean_estimate(model, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor, extra_args: dict,
                   substeps: int) -> torch.Tensor:
    """Step k's clean estimate: ``x`` at ``sigma`` completed to t = 0 by ``substeps`` Euler ODE steps (1 = Tweedie).

    The velocity is the sampler's own: v = (x - model(x, sigma, **extra_args)) / sigma with ComfyUI's guided
    denoiser ``model`` (CFG and all). ``denoised`` = model(x, sigma), which the sampler has just computed, serves the
    first substep, so T' = 1 costs no extra model call and T' substeps cost T' - 1.

    Args:
        model: the sampler's denoiser, model(x [B, ...], sigma [B], **extra_args) -> x0 [B, ...].
        x, denoised: [B, ...] in the model's latent space; sigma: 0-d noise level of ``x``.

    Returns:
        [B, ...] float32 clean estimate (``x`` itself at sigma 0, where it is already clean).
    """
    if float(sigma) <= 0:
        return x.float()
    calls = itertools.count()

    def velocity(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if next(calls) == 0:  # complete() starts at (x, sigma): the sampler's evaluation
            return (x.float() - denoised.float()) / float(sigma)
        # complete() evaluates at t = sigma * (1 - k / substeps), k < substeps: never at t = 0
        return (y - model(y.to(x.dtype), t.to(x.dtype), **extra_args).float()) / expand_like(t.float(), y)

    return complete(velocity, x, sigma, substeps)


def sample_with_estimates(model, x, sigmas, extra_args=None, callback=None, disable=None, *, sde: str,
                          strength: float, substeps: int, estimates: list[torch.Tensor]) -> torch.Tensor:
    """``sample_sfgrpo`` that appends each step's clean estimate [B, ...] (float32, model space) to ``estimates``.

    ComfyUI's step callback (live preview, progress bar) is given the estimate as "denoised", so the preview shows
    exactly what the node outputs.
    """
    import comfy.model_management

    extra_args = {} if extra_args is None else extra_args

    def on_step(info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        estimate = clean_estimate(model, info["x"], info["sigma"], info["denoised"], extra_args, substeps)
        estimates.append(estimate.to(comfy.model_management.intermediate_device()))
        if callback is not None:
            callback({**info, "denoised": estimate.to(info["denoised"].dtype)})

    return sample_sfgrpo(model, x, sigmas, extra_args, on_step, disable, sde=sde, strength=strength)


class SFGRPOTweediePreview(io.ComfyNode):
    """Samples like SamplerCustom with the Stepwise-Flow-GRPO sampler and shows every step's clean estimate."""

    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="SFGRPOTweediePreview", display_name="Stepwise-Flow-GRPO Tweedie Preview", category=CATEGORY,
            description="Shows what each denoising step means: at every step, the clean image the current noisy "
                        "latent points at (its Tweedie estimate, or T' ODE substeps to t = 0), as Stepwise-Flow-GRPO "
                        "credits steps. With a reward connected it plots each step's reward and gain (the paper's "
                        "Figure 1). Needs a flow-matching model (SD3/SD3.5, FLUX, the mini world).",
            inputs=[
                io.Model.Input("model", tooltip="A flow-matching (rectified-flow) model."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning (unused at cfg 1)."),
                io.Latent.Input("latent_image", tooltip="The latent to start from, e.g. an empty latent image; its "
                                                        "batch size is the number of samples (rows of the grid)."),
                io.Vae.Input("vae", tooltip="Decodes every estimate to an image."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the start noise (as SamplerCustom) and the SDE's step noise."),
                io.Int.Input("steps", default=8, min=1, max=200,
                             tooltip="Denoising steps T: the grid has T + 1 columns (T estimates, then the final "
                                     "image)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 uses the positive conditioning only."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="simple",
                               tooltip="The sigma schedule (as in KSampler / BasicScheduler)."),
                io.Combo.Input("sde", options=list(SDE_NAMES), default="ddim",
                               tooltip="ddim: the paper's SDE; flow_grpo: Flow-GRPO's SDE; cps: coefficient-"
                                       "preserving sampling; ode: deterministic Euler (strength is ignored)."),
                io.Float.Input("strength", default=DEFAULT_ETA, min=0.0, max=1.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
                io.Int.Input("substeps", default=1, min=1, max=100, display_name="substeps (T')",
                             tooltip="How each step is completed to a clean image: 1 = the one-step Tweedie "
                                     "estimate x - t v (free: the sampler's own model call); T' > 1 = T' Euler ODE "
                                     "substeps from the step's t to 0 (T' - 1 extra model calls per step, sharper "
                                     "early estimates)."),
                Reward.Input("reward", optional=True,
                             tooltip="Optional: a reward from Load Reward, to plot the reward of every estimate."),
                io.String.Input("prompt", optional=True, default="",
                                tooltip="The prompt text the reward should judge (needed by prompt-aware rewards "
                                        "such as mini_geneval; the conditioning does not carry the text)."),
            ],
            outputs=[
                io.Image.Output(display_name="estimates",
                                tooltip="For each sample in turn: its T step estimates in step order, then its final "
                                        "image (batch of samples x (T + 1))."),
                io.Image.Output(display_name="grid", tooltip="One image: a row per sample, a column per step "
                                                             "(T estimates, then the final image)."),
                io.Latent.Output(display_name="samples", tooltip="The final samples, as SamplerCustom outputs them."),
                io.Image.Output(display_name="reward_curve",
                                tooltip="Reward of each step's estimate against t with each step's gain marked; a "
                                        "small note when no reward is connected."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, vae, seed, steps, cfg, scheduler, sde, strength,
                substeps, reward: LoadedReward | None = None, prompt: str = "") -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        require_finite(cfg=cfg, strength=strength)
        if substeps < 1:
            raise ValueError(f"substeps: must be at least 1, got {substeps}")
        if reward is not None and not isinstance(reward, LoadedReward):
            raise ValueError("reward: expected the output of Stepwise-Flow-GRPO Load Reward")
        model_sampling = patched_model_sampling(model)  # with patches such as ModelSamplingDiscrete
        require_flow_sampling(model_sampling)

        latent = latent_image.copy()
        start = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if start.ndim != 4:  # the grid and the reward curve are per image; video latents are [B, C, F, H, W]
            raise ValueError(f"latent_image: this preview needs an image latent [B, C, H, W], got shape "
                             f"{tuple(start.shape)} (video latents are not supported)")
        latent["samples"] = start
        noise = comfy.sample.prepare_noise(start, seed, latent.get("batch_index"))  # as SamplerCustom
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
        estimates: list[torch.Tensor] = []
        sampler = comfy.samplers.KSAMPLER(
            functools.partial(sample_with_estimates, substeps=substeps, estimates=estimates),
            {"sde": sde, "strength": strength})
        samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, start, noise_mask=latent.get("noise_mask"),
            callback=latent_preview.prepare_callback(model, steps),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent.copy()
        out["samples"] = samples

        # The sampler works in model space; comfy.sample returns samples after process_latent_out: match it.
        batch = samples.shape[0]
        trajectory = torch.stack([model.model.process_latent_out(e.float()).to(samples.dtype) for e in estimates]
                                 + [samples], dim=1)  # [B, T + 1, ...]
        images = vae.decode(trajectory.flatten(0, 1))  # [B * (T + 1), H, W, 3]
        height, width = images.shape[1:3]
        columns = trajectory.shape[1]
        grid = (images.reshape(batch, columns, height, width, 3).permute(0, 2, 1, 3, 4)
                .reshape(1, batch * height, columns * width, 3))

        if reward is None:
            curve = message_image(NO_REWARD_TEXT)
        else:
            comfy.model_management.throw_exception_if_processing_interrupted()
            curve = step_reward_figure(cls._step_rewards(reward, images, prompt, batch), sigmas.numpy(),
                                       title=f"{reward.name} of each step's clean estimate ({sde}, T'={substeps})")
        # The curves are also shown on the node itself (a temp-folder preview, as Preview Image does).
        curve_image = image_tensor(curve)
        return io.NodeOutput(images, grid, out, curve_image, ui=ui.PreviewImage(curve_image, cls=cls))

    @staticmethod
    def _step_rewards(reward: LoadedReward, images: torch.Tensor, prompt: str, batch: int) -> torch.Tensor:
        """Scores [B, T + 1] of the decoded trajectory (NaN where an image could not be scored)."""
        text = prompt.strip()
        try:
            scores = score_images(reward, images, [text] * images.shape[0])
        except ValueError as error:
            if not text:
                raise ValueError(f"prompt: empty, and {error}; write the prompt text the reward should "
                                 f"judge") from None
            raise
        return scores.reshape(batch, -1)


NODES = [SFGRPOTweediePreview]
