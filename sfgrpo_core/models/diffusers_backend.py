"""Diffusers transformers (SD3/SD3.5 MMDiT and FLUX) as VelocityModels, and the 'diffusers' backend.

Each call follows what diffusers' StableDiffusion3Pipeline / FluxPipeline pass to the transformer, so that one of
our Euler steps ``x + (s - t) v`` is exactly FlowMatchEulerDiscreteScheduler.step on the same output:
- SD3: ``transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states, pooled_projections)``.
- FLUX: the latent [B, C, H, W] is packed into 2x2 patches [B, H/2 * W/2, 4C] (FluxPipeline._pack_latents),
  ``timestep`` is (sigma * 1000) in the compute dtype divided by 1000, ``guidance`` is the unscaled guidance
  (e.g. 3.5) for guidance-distilled models, ``txt_ids`` are zeros [L, 3] and ``img_ids`` (0, row, col) per patch;
  the output is unpacked back to [B, C, H, W].
Both predict v = x1 - x0 for x_t = (1 - t) x0 + t x1 (t = sigma). No classifier-free guidance: one conditional
branch per sample (docs/algorithm.md section 6).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..images import to_uint8
from .base import register_backend
from .precision import fast_dtype

# Memory a float32 decode of the SD3 / FLUX VAE needs per output pixel at its peak: 4.0 GiB for one 1024 x 1024
# image, 1.0 GiB at 512 x 512 (benchmarks/activation_memory.py, benchmarks/results/activation_memory_sd35m_*.json).
DECODE_BYTES_PER_PIXEL = 4096


def images_per_decode(free_bytes: int, image_pixels: int, bytes_per_pixel: int = DECODE_BYTES_PER_PIXEL) -> int:
    """How many images one decode call may hold so that its peak stays within 80% of ``free_bytes`` (at least one),
    as ComfyUI sizes its VAE batches: a reward batch of 64 images at 1024 px would need ~256 GiB at once."""
    return max(1, int(0.8 * free_bytes) // max(1, image_pixels * bytes_per_pixel))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the CUDA device's free bytes, else the host's MemAvailable (Linux; else 8 GiB)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# The attention projections of every block, Flow-GRPO's LoRA targets. The names are matched as suffixes, so in
# FLUX they also cover the single blocks' attn.to_q/to_k/to_v (those blocks have no to_out or add_* layers), and in
# SD3.5 the second attention (attn2) of its dual-attention layers.
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

# Prompts for a pipeline run whose config names none (any image reward can score them).
DEFAULT_PROMPTS = ("a photo of a red apple on a wooden table", "a cat sitting on a windowsill",
                   "a watercolor painting of a lighthouse at sunset", "two blue cups next to a green plant")
DEFAULT_EVAL_PROMPTS = ("a photo of a yellow bicycle", "a bowl of oranges on a kitchen counter")

PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
"""prompts -> {"context": [B, L, D], "pooled": [B, P]} (batch-first tensors only, so the trainer can index rows)."""


def architecture_of(transformer: nn.Module) -> str:
    """'sd3' for an SD3Transformer2DModel, 'flux' for a FluxTransformer2DModel. Raises ValueError otherwise."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    raise ValueError(f"{type(transformer).__name__} is not supported: use an SD3Transformer2DModel or a "
                     "FluxTransformer2DModel")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX packing (FluxPipeline._pack_latents): [B, C, H, W] -> [B, H/2 * W/2, 4C], 2x2 patches, row-major."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: [B, H/2 * W/2, 4C] -> [B, C, H, W] for a latent of ``height`` x ``width``."""
    batch, _, packed_channels = packed.shape
    patches = packed.view(batch, height // 2, width // 2, packed_channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed_channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX position ids of the packed patches: [H/2 * W/2, 3] rows (0, row, column)."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], quantized as diffusers' VaeImageProcessor does."""
    return to_uint8(images.float() / 2 + 0.5).permute(0, 2, 3, 1).contiguous()


class DiffusersFlowModel:
    """A diffusers SD3 or FLUX transformer and a VAE as a VelocityModel over unpacked latents [B, C, H, W].

    Args:
        transformer: SD3Transformer2DModel or FluxTransformer2DModel; moved to ``device`` / ``dtype`` and frozen.
        vae: anything with ``decode(z, return_dict=False)[0]`` returning images in [-1, 1] (AutoencoderKL,
            AutoencoderTiny); kept in float32.
        encode_prompts: prompts -> {"context": [B, L, joint_attention_dim], "pooled": [B, pooled_projection_dim]}.
        vae_scaling_factor, vae_shift_factor: the decoder reads ``latents / scaling + shift``.
        latent_channels: C; latent_size: (H, W) of the latent (even for FLUX).
        guidance: the embedded guidance of guidance-distilled FLUX models (FLUX.1-dev: 3.5); None otherwise.
        default_lora_targets: None gives ``ATTENTION_LORA_TARGETS``.
        decode_dtype: autocast dtype of the VAE decoder (weights stay float32), e.g.
            ``precision.fast_autocast_dtype(device)`` for a small TAESD (bfloat16 only where it is native and faster;
            images within 3/255); None decodes in float32 (safe for SD/FLUX VAEs).
        gradient_checkpointing: recompute each transformer block's activations in the backward pass instead of
            keeping them (diffusers' own ``enable_gradient_checkpointing``; the gradients are the same). What a
            transition keeps for backward on SD3.5-Medium at 1024 px falls from GiBs to MiBs
            (benchmarks/activation_memory.py); the update's forward passes cost about a third more.

    Raises:
        ValueError: for an unsupported transformer, an odd FLUX latent size, or a guidance that does not fit the
            transformer (missing for a guidance-distilled FLUX model, given for any other).
    """

    module: nn.Module
    vae: Any
    default_lora_targets: tuple[str, ...]
    fused_lora_parts: Mapping[str, tuple[int, ...]] = MappingProxyType({})  # diffusers keeps q, k, v apart
    sample_shape: tuple[int, ...]
    default_prompts: tuple[str, ...]
    default_eval_prompts: tuple[str, ...]

    def __init__(self, transformer: nn.Module, vae: nn.Module, encode_prompts: PromptEncoder, *,
                 vae_scaling_factor: float, vae_shift_factor: float, latent_channels: int,
                 latent_size: tuple[int, int], default_prompts: Sequence[str] = (),
                 default_eval_prompts: Sequence[str] = (), device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, guidance: float | None = None,
                 default_lora_targets: Sequence[str] | None = None, decode_dtype: torch.dtype | None = None,
                 gradient_checkpointing: bool = False):
        self.architecture = architecture_of(transformer)
        self.device, self.dtype = torch.device(device), dtype
        height, width = latent_size
        if self.architecture == "flux" and (height % 2 or width % 2):
            raise ValueError(f"FLUX packs 2x2 latent patches: the latent size must be even, got {height}x{width}")
        guided = bool(getattr(transformer.config, "guidance_embeds", False))
        if guided and guidance is None:
            raise ValueError("guidance: this FLUX transformer is guidance-distilled (guidance_embeds=True); pass the "
                             "guidance FluxPipeline would use, e.g. 3.5")
        if not guided and guidance is not None:
            raise ValueError(f"guidance: {guidance} given, but this transformer has no guidance embedding")
        self.module = _place(transformer, self.device, dtype)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()  # type: ignore[operator]
        self.vae = _place(vae, self.device, torch.float32).to(memory_format=torch.channels_last)
        self.decode_dtype = decode_dtype
        self._encode = encode_prompts
        self.vae_scaling_factor, self.vae_shift_factor = vae_scaling_factor, vae_shift_factor
        self.guidance = guidance
        self.sample_shape = (latent_channels, height, width)
        self.default_prompts, self.default_eval_prompts = tuple(default_prompts), tuple(default_eval_prompts)
        self.default_lora_targets = tuple(default_lora_targets or ATTENTION_LORA_TARGETS)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = x1 - x0 at x [B, C, H, W] and sigma [B] in [0, 1], computed in ``dtype``; float32 [B, C, H, W]."""
        hidden = x.to(self.device, self.dtype)
        sigma = sigma.to(self.device, torch.float32)
        context = condition["context"].to(self.device, self.dtype)
        pooled = condition["pooled"].to(self.device, self.dtype)
        if self.architecture == "sd3":
            output = self.module(hidden_states=hidden, timestep=sigma * 1000, encoder_hidden_states=context,
                                 pooled_projections=pooled, return_dict=False)[0]
            return output.float()
        height, width = x.shape[-2:]
        guidance = None if self.guidance is None else torch.full_like(sigma, self.guidance)
        output = self.module(hidden_states=pack_latents(hidden), timestep=(sigma * 1000).to(self.dtype) / 1000,
                             guidance=guidance, pooled_projections=pooled, encoder_hidden_states=context,
                             txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=self.dtype),
                             img_ids=latent_image_ids(height, width, self.device, self.dtype), return_dict=False)[0]
        return unpack_latents(output, height, width).float()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"context": [B, L, D], "pooled": [B, P]} on ``device`` for B = len(prompts).

        Raises:
            ValueError: if the encoder's result lacks these batch-first tensors.
        """
        condition = self._encode(list(prompts))
        for key in ("context", "pooled"):
            tensor = condition.get(key) if isinstance(condition, dict) else None
            if not isinstance(tensor, torch.Tensor) or tensor.shape[0] != len(prompts):
                raise ValueError(f"encode_prompts must return {{'context': [B, L, D], 'pooled': [B, P]}} with "
                                 f"B = {len(prompts)}; {key!r} is {type(tensor).__name__}")
        return {key: condition[key].to(self.device) for key in ("context", "pooled")}

    def export_lora(self, lora_path: str | Path) -> Path:
        """Write a trained LoRA file (sfgrpo_core.lora.save_lora) beside itself in diffusers' format:
        lora_diffusers.safetensors, the one file for both ``pipeline.load_lora_weights`` and ComfyUI's stock LoRA
        loaders (LoraLoaderModelOnly maps diffusers' SD3 / FLUX keys, q/k/v onto its fused qkv Linear, itself; see
        sfgrpo_core.lora.formats). Returns its path.
        """
        from ..lora.formats import export_lora

        return export_lora(lora_path, Path(lora_path).with_name("lora_diffusers.safetensors"))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Clean latents [B, C, H, W] -> uint8 images [B, H * f, W * f, 3] through the float32 VAE, as many at a
        time as the device's free memory holds (``images_per_decode``; the images do not depend on it)."""
        latents = x.to(self.device, torch.float32) / self.vae_scaling_factor + self.vae_shift_factor
        scale = 2 ** (len(getattr(self.vae.config, "block_out_channels", (0,) * 4)) - 1)
        pixels = latents.shape[-2] * latents.shape[-1] * scale * scale
        chunk = images_per_decode(free_memory_bytes(self.device), pixels)
        parts = []
        for start in range(0, len(latents), chunk):
            with torch.autocast(self.device.type, dtype=self.decode_dtype or torch.float32,
                                enabled=self.decode_dtype is not None):
                images = self.vae.decode(latents[start : start + chunk], return_dict=False)[0]
            parts.append(to_uint8_images(images.float()).cpu())
        return torch.cat(parts)


def pipeline_prompt_encoder(pipeline: Any, device: str | torch.device,
                            max_sequence_length: int | None = None) -> PromptEncoder:
    """The pipeline's own ``encode_prompt`` (conditional branch only) as a PromptEncoder.

    Args:
        pipeline: a StableDiffusion3Pipeline or FluxPipeline.
        max_sequence_length: T5 tokens per prompt; None keeps the pipeline's default (SD3 256, FLUX 512).
    """
    architecture = architecture_of(pipeline.transformer)
    options: dict[str, Any] = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        if architecture == "sd3":
            context, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, device=torch.device(device),
                                                           do_classifier_free_guidance=False, **options)
        else:
            context, pooled, _ = pipeline.encode_prompt(prompts, None, device=torch.device(device), **options)
        return {"context": context, "pooled": pooled}

    return encode


def model_from_pipeline(pipeline: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        latent_size: int | None = None, guidance: float | None = None,
                        max_sequence_length: int | None = None, default_prompts: Sequence[str] = DEFAULT_PROMPTS,
                        default_eval_prompts: Sequence[str] = DEFAULT_EVAL_PROMPTS,
                        gradient_checkpointing: bool = True) -> DiffusersFlowModel:
    """A DiffusersFlowModel over a loaded SD3 / FLUX pipeline: its transformer, VAE (and VAE factors) and
    ``encode_prompt``; the text encoders move to ``device``.

    Args:
        latent_size: latent height = width; None gives the pipeline's default_sample_size (128 = 1024 px for SD3.5
            and FLUX).
        guidance: for guidance-distilled FLUX; None gives FluxPipeline's default 3.5 there.
        gradient_checkpointing: on by default for real models (see DiffusersFlowModel): without it one SD3.5-M
            transition at 1024 px keeps ~GiBs for its backward pass.
    """
    transformer = pipeline.transformer
    if guidance is None and getattr(transformer.config, "guidance_embeds", False):
        guidance = 3.5
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipeline, name, None)
        if encoder is not None:
            encoder.to(device)
    size = latent_size or pipeline.default_sample_size
    config = pipeline.vae.config
    return DiffusersFlowModel(
        transformer, pipeline.vae, pipeline_prompt_encoder(pipeline, device, max_sequence_length),
        vae_scaling_factor=config.scaling_factor, vae_shift_factor=config.shift_factor or 0.0,
        latent_channels=config.latent_channels, latent_size=(size, size), default_prompts=default_prompts,
        default_eval_prompts=default_eval_prompts, device=device, dtype=dtype, guidance=guidance,
        gradient_checkpointing=gradient_checkpointing)


def load_pipeline_model(path: str = "", device: str = "cpu", dtype: str | torch.dtype | None = None,
                        **options: Any) -> DiffusersFlowModel:
    """The 'diffusers' backend: a local StableDiffusion3Pipeline or FluxPipeline folder (as written by
    ``save_pretrained``), never downloaded.

    Args:
        path: the pipeline folder (holding model_index.json).
        dtype: compute dtype of the transformer and text encoders ('float32', 'bfloat16', ...); None gives
            ``precision.fast_dtype(device)``: bfloat16 on CUDA, and on a CPU only where bfloat16 is native and
            measured faster; float32 elsewhere. The VAE always decodes in float32.
        options: ``latent_size``, ``guidance``, ``max_sequence_length``, ``gradient_checkpointing`` (default true;
            see ``model_from_pipeline``); other keyword arguments the trainer passes (seed, cache_dir) are ignored.

    Raises:
        ValueError: naming model.path when the folder is missing, is not a diffusers pipeline, or holds another
            pipeline class.
    """
    folder = Path(path) if path else None
    if folder is None or not (folder / "model_index.json").is_file():
        raise ValueError(f"model.path: {path!r} is not a local diffusers pipeline folder (no model_index.json); "
                         "set it to a StableDiffusion3Pipeline or FluxPipeline saved with save_pretrained (nothing "
                         "is downloaded)")
    known = {key: options[key] for key in ("latent_size", "guidance", "max_sequence_length", "gradient_checkpointing")
             if key in options}
    if not isinstance(known.get("gradient_checkpointing", True), bool):
        raise ValueError(f"model.options: gradient_checkpointing must be true or false, got "
                         f"{known['gradient_checkpointing']!r}")
    torch_dtype = _resolve_dtype(dtype, device)
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # diffusers >= 0.42 prefers `dtype`, which older releases do not accept
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch_dtype)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"model.path: cannot load the diffusers pipeline in {path!r}: {error}") from None
    if type(pipeline).__name__ not in ("StableDiffusion3Pipeline", "FluxPipeline"):
        raise ValueError(f"model.path: {path!r} holds a {type(pipeline).__name__}; the 'diffusers' backend loads "
                         "StableDiffusion3Pipeline and FluxPipeline folders")
    return model_from_pipeline(pipeline, device=device, dtype=torch_dtype, **known)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` on ``device`` in ``dtype``, frozen, in eval mode (cast only when needed: diffusers' ``to(dtype)``
    logs a warning every time)."""
    module.to(device)
    if any(parameter.dtype != dtype for parameter in module.parameters()):
        module.to(dtype)
    return module.train(False).requires_grad_(False)


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return fast_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: {dtype!r} is not a torch dtype such as 'float32' or 'bfloat16'")
    return resolved


register_backend("diffusers", load_pipeline_model)
