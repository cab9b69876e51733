"""The Stepwise-Flow-GRPO samplers as a ComfyUI SAMPLER and as names in the stock KSampler's list.

Every step calls the trainer's own step function (``sfgrpo_core.algorithm.sde.get_step_function``), so an image
sampled in ComfyUI follows exactly the policy the trainer optimises. Imported only inside ComfyUI (it needs comfy_api).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..sfgrpo_core.algorithm.sde import SDE_NAMES, get_step_function
from ..sfgrpo_core.config import SamplerConfig
from ..sfgrpo_core.seeding import derive_seed, member_generators, member_noise
from .types import CATEGORY as PACK_CATEGORY
from .types import require_finite

CATEGORY = f"{PACK_CATEGORY}/sampling"

# The trainer's default noise strengths (SamplerConfig: eta for ddim and cps, noise_level for flow_grpo).
DEFAULT_ETA, DEFAULT_NOISE_LEVEL = SamplerConfig().eta, SamplerConfig().noise_level
# KSampler list name -> (sde, strength)
KSAMPLER_SDES = {
    "sfgrpo_ddim_sde": ("ddim", DEFAULT_ETA),
    "sfgrpo_flow_sde": ("flow_grpo", DEFAULT_NOISE_LEVEL),
    "sfgrpo_cps_sde": ("cps", DEFAULT_ETA),
}

STRENGTH_TOOLTIP = (
    "Noise strength of the SDE: eta for ddim and cps (0..1), the noise level a for flow_grpo; ignored by ode. "
    "0 gives the deterministic Euler (ODE) sampler. ddim is a few-step sampler (the paper uses ~10 steps): "
    "its noise std is eta * s * sqrt(1 - t) per step, so with many steps the samples become under-dispersed."
)


def model_sampling_of(model) -> object | None:
    """The ``model_sampling`` object behind a ComfyUI sampler model (KSamplerX0Inpaint -> guider -> BaseModel)."""
    while model is not None:
        sampling = getattr(model, "model_sampling", None)
        if sampling is not None:
            return sampling
        model = getattr(model, "inner_model", None)
    return None


def require_flow_sampling(sampling: object, field: str = "model") -> None:
    """Raise ValueError naming ``field`` unless ``sampling`` is rectified flow (ComfyUI's CONST model sampling)."""
    import comfy.model_sampling

    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise ValueError(f"{field}: Stepwise-Flow-GRPO needs a flow-matching model (SD3/SD3.5, FLUX, ...); this "
                         f"model's sampling is {type(sampling).__name__}, not rectified flow (CONST). Load a flow "
                         "model, or remove the ModelSampling node that changed it")


def require_flow_model(model) -> None:
    """Raise ValueError unless the sampler's ``model`` predicts a rectified-flow velocity."""
    require_flow_sampling(model_sampling_of(model))


def step_generators(seed: int | None, batch_size: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per batch element on ``device``, seeded by ``derive_seed(seed, index, "steps")`` (seed None
    -> 0). A sample's step noise depends only on (seed, its index), as a trainer member's depends only on its seed.
    """
    return member_generators([derive_seed(seed or 0, index, "steps") for index in range(batch_size)], device)


@torch.no_grad()
def sample_sfgrpo(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                  disable: bool | None = None, sde: str = "ddim", strength: float = DEFAULT_ETA) -> torch.Tensor:
    """k-diffusion style sampler: ``sde`` steps of sfgrpo_core from sigmas[0] to sigmas[-1].

    Args:
        model: ComfyUI's denoiser, model(x, sigma [B], **extra_args) -> denoised x0 [B, C, H, W].
        x: the noised start latent [B, C, H, W] at sigmas[0]; sigmas: [T + 1] decreasing, in [0, 1].
        extra_args: passed to the model; its "seed" seeds the step noise (see ``step_generators``).
        callback: called every step with {"x", "i", "sigma", "sigma_hat", "denoised"}.
        disable: unused (progress comes through ``callback``).
        sde, strength: as ``get_step_function``.

    Returns:
        The sample at sigmas[-1], dtype of ``x``. A step to sigma 0 lands on the denoised estimate (Euler step).

    Raises:
        ValueError: for a model that is not a flow-matching one, or an unknown ``sde``.
    """
    import comfy.model_management

    extra_args = {} if extra_args is None else extra_args
    require_flow_model(model)
    step = get_step_function(sde, strength)
    generators = step_generators(extra_args.get("seed"), x.shape[0], x.device)
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        velocity = (x - denoised) / sigma
        x = step(x, velocity, sigma, sigma_next, noise=member_noise(generators, x)).prev_sample.to(x.dtype)
    if not torch.isfinite(x).all():
        raise ValueError("sampler: the sample has non-finite values (NaN/inf): the model diverged at this precision "
                         "or these inputs; try weight_dtype default (float32) in the model loader, or fewer steps")
    return x


def make_sampler(sde: str, strength: float):
    """A ComfyUI SAMPLER (comfy.samplers.KSAMPLER) running ``sample_sfgrpo`` with ``sde`` and ``strength``."""
    import comfy.samplers

    get_step_function(sde, strength)  # fail fast on an unknown sde, when the node runs rather than when it samples
    return comfy.samplers.KSAMPLER(sample_sfgrpo, {"sde": sde, "strength": strength})


def _ksampler_function(sde: str, strength: float):
    """``sample_sfgrpo`` with its sde and strength bound, for a name in the stock KSampler's list."""

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return sample_sfgrpo(model, x, sigmas, extra_args, callback, disable, sde=sde, strength=strength)

    sample.__doc__ = f"sfgrpo {sde} SDE, strength {strength} (see sample_sfgrpo)."
    return sample


def register_ksampler_names() -> None:
    """Add ``KSAMPLER_SDES`` to the stock KSampler / KSamplerSelect lists, once; nothing outside ComfyUI."""
    try:
        import comfy.k_diffusion.sampling
        import comfy.samplers
    except ImportError:
        return
    for name, (sde, strength) in KSAMPLER_SDES.items():
        setattr(comfy.k_diffusion.sampling, f"sample_{name}", _ksampler_function(sde, strength))
        # 0.3.75: SAMPLER_NAMES (KSampler.SAMPLERS, KSamplerSelect) is a copy of KSAMPLER_NAMES plus ddim/uni_pc.
        for names in (comfy.samplers.KSampler.SAMPLERS, comfy.samplers.SAMPLER_NAMES, comfy.samplers.KSAMPLER_NAMES):
            if name not in names:
                names.append(name)


class SFGRPOSampler(io.ComfyNode):
    """SAMPLER of the Stepwise-Flow-GRPO SDEs, for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOSampler", display_name="Stepwise-Flow-GRPO Sampler", category=CATEGORY,
            description="Samples a flow-matching model (SD3/SD3.5, FLUX) with the same SDE step the Stepwise-Flow-"
                        "GRPO trainer uses. Step noise is seeded by the sampler's seed (deterministic).",
            inputs=[
                io.Combo.Input("sde", options=list(SDE_NAMES), default="ddim", tooltip=(
                    "ddim: the paper's DDIM-inspired SDE (few steps); flow_grpo: Flow-GRPO's SDE; cps: coefficient-"
                    "preserving sampling; ode: deterministic Euler.")),
                io.Float.Input("strength", default=DEFAULT_ETA, min=0.0, max=1.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="The sampler; connect it to SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, sde: str, strength: float) -> io.NodeOutput:
        require_finite(strength=strength)
        return io.NodeOutput(make_sampler(sde, strength))



NODES = [SFGRPOSampler]
