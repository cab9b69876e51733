"""A ComfyUI MODEL (+ VAE + prompt conditioning) behind sfgrpo_core's VelocityModel protocol.

The trainer sees latents in the model's own space (ComfyUI's ``process_latent_in`` applied), exactly what ComfyUI's
samplers integrate; decoding converts back with ``process_latent_out`` and the VAE. The velocity comes from
ComfyUI's own ``apply_model`` (so model patches and wrappers apply): for rectified flow (CONST model sampling)
denoised = x - sigma * v, hence v = (x - denoised) / sigma.

LoRA adapters go on the loaded diffusion model in place (peft, through sfgrpo_core.lora) for the length of a
training run and are removed afterwards (``trainable``); no copy of the base weights is made.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..sfgrpo_core.atomic import atomic_save_safetensors
from ..sfgrpo_core.images import to_uint8
from ..sfgrpo_core.lora.adapters import detach_lora, read_lora
from ..sfgrpo_core.lora.formats import comfyui_to_diffusers, peft_to_comfyui_native
from .sampler import require_flow_sampling
from .types import PromptSet

# Attention projections of ComfyUI's own module names (matched as suffixes), per diffusion model class: SD3/SD3.5
# MMDiT and FLUX; the same layers Flow-GRPO adapts in diffusers' naming.
LORA_TARGETS = {
    "OpenAISignatureMMDITWrapper": ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj"),
    "Flux": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2"),
}
# ComfyUI diffusion model class -> the architecture name of sfgrpo_core.lora.formats (for the diffusers export).
ARCHITECTURES = {"OpenAISignatureMMDITWrapper": "sd3", "Flux": "flux"}
FALLBACK_LORA_TARGETS = ("qkv", "proj", "to_q", "to_k", "to_v", "to_out.0")
# The run folder's LoRA in ComfyUI's native format (ComfyFlowModel.export_lora), which the node also puts in loras/.
COMFYUI_LORA_FILE = "lora_comfyui.safetensors"


def require_flow_patcher(patcher: Any, field: str = "model") -> None:
    """Raise ValueError naming ``field`` unless the MODEL is a rectified-flow model (CONST model sampling)."""
    require_flow_sampling(patched_model_sampling(patcher), field)


def patched_model_sampling(patcher: Any) -> Any:
    """The MODEL's sampling as it will run: with object patches (ModelSamplingSD3, ModelSamplingDiscrete, ...)
    applied, which ``patcher.model.model_sampling`` only shows once the patcher is loaded."""
    getter = getattr(patcher, "get_model_object", None)
    return getter("model_sampling") if getter is not None else None


def make_parameters_trainable_safe(module: nn.Module) -> None:
    """Replace inference-mode parameters and buffers by ordinary tensors with the same values.

    ComfyUI runs every node under torch.inference_mode(), so a model a loader node built has inference tensors,
    which autograd refuses to save for backward; gradients to LoRA adapters must flow back through those frozen
    weights. Each tensor is re-materialised once (one tensor at a time, not a second copy of the model).
    """
    with torch.inference_mode(False):
        for owner in module.modules():
            for name, parameter in list(owner.named_parameters(recurse=False)):
                if parameter.is_inference():
                    setattr(owner, name, nn.Parameter(parameter.clone(), requires_grad=parameter.requires_grad))
            for name, buffer in list(owner.named_buffers(recurse=False)):
                if buffer is not None and buffer.is_inference():
                    persistent = name not in owner._non_persistent_buffers_set
                    owner.register_buffer(name, buffer.clone(), persistent=persistent)


def fused_linears(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """ComfyUI's fused Linears -> row sizes of the projections they stack: q, k, v of every '...qkv' (SD3/SD3.5 and
    FLUX attention), and q, k, v, mlp of FLUX's single-block linear1 (diffusers keeps them as separate Linears)."""
    parts: dict[str, tuple[int, ...]] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if name.endswith("qkv") and layer.out_features % 3 == 0:
            parts[name] = (layer.out_features // 3,) * 3
        elif name.endswith("linear1") and name.startswith("single_blocks."):
            block: Any = module.get_submodule(name.rpartition(".")[0])  # ComfyUI's SingleStreamBlock
            hidden = int(block.hidden_dim)
            parts[name] = (hidden, hidden, hidden, layer.out_features - 3 * hidden)
    return parts


class ComfyFlowModel:
    """VelocityModel over a ComfyUI ModelPatcher, a ComfyUI VAE and encoded prompts.

    Args:
        patcher: the MODEL (a ModelPatcher of a flow model); loaded onto its device here.
        vae: the VAE that decodes its latents (ComfyUI's VAE object).
        prompts: every prompt the run may use (train and evaluation) with its conditioning.
        width, height: image size in pixels (multiples of 16); the latent is 1/8 of it.
        decode_autocast: decode the reward's images under torch.autocast with this dtype on the VAE's device
            (bfloat16 makes a small VAE ~3x faster on a CPU, within ~3/255); None decodes as ComfyUI does.
    """

    def __init__(self, patcher: Any, vae: Any, prompts: PromptSet, *, width: int, height: int,
                 default_prompts: Sequence[str] = (),
                 default_eval_prompts: Sequence[str] = (), decode_autocast: torch.dtype | None = None):
        import comfy.model_management

        require_flow_patcher(patcher)
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        self.patcher = patcher
        self.base_model = patcher.model
        self.module: nn.Module = patcher.model.diffusion_model
        self.vae = vae
        self.prompts = prompts
        self.device = patcher.load_device
        channels = int(patcher.model.latent_format.latent_channels)
        self.sample_shape: tuple[int, ...] = (channels, height // 8, width // 8)
        self.default_lora_targets = LORA_TARGETS.get(type(self.module).__name__, FALLBACK_LORA_TARGETS)
        self.fused_lora_parts = fused_linears(self.module)
        self.default_prompts = tuple(default_prompts) or prompts.texts
        self.default_eval_prompts = tuple(default_eval_prompts)
        self._model_conds: dict[int, dict[str, Any]] = {}
        self.decode_autocast = decode_autocast

    # --- VelocityModel -------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Rows index into the prompt set; the model conditioning is built per prompt when first needed."""
        unknown = [text for text in prompts if text not in self.prompts.texts]
        if unknown:
            raise ValueError(f"prompts: {unknown[0]!r} was not encoded; connect it through a Prompts node")
        return {"prompt_index": torch.tensor([self.prompts.texts.index(text) for text in prompts])}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = (x - denoised) / sigma from ComfyUI's apply_model, rows with the same prompt shapes batched together.

        Checks ComfyUI's interrupt flag first, so Cancel stops training within one model call.
        """
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        index = condition["prompt_index"].tolist()
        x = x.to(self.device)
        sigma = sigma.to(self.device, torch.float32)
        velocity = torch.empty_like(x, dtype=torch.float32)
        for rows in self._rows_by_shape(index):
            conds = self._batched_conds([index[row] for row in rows], x)
            selected = torch.tensor(rows, device=x.device)
            denoised = self._apply_model(x[selected], sigma[selected], conds).float()
            velocity[selected] = (x[selected].float() - denoised) / sigma[selected].view(-1, *[1] * (x.dim() - 1))
        return velocity

    def _apply_model(self, x: torch.Tensor, sigma: torch.Tensor, conds: dict[str, Any]) -> torch.Tensor:
        """ComfyUI's apply_model as its samplers call it (comfy.samplers._calc_cond_batch): with the patcher's
        transformer_options (attention patches), its wrappers and callbacks (APPLY_MODEL wrappers) and its
        model_function_wrapper, so what other nodes set on the MODEL applies to training and evaluation as it
        does to sampling."""
        import comfy.patcher_extension

        model_options = self.patcher.model_options
        options = comfy.patcher_extension.merge_nested_dicts({}, model_options.get("transformer_options", {}))
        # The patcher's own wrappers and callbacks, as comfy.sampler_helpers.prepare_model_patcher adds them.
        for kind in ("wrappers", "callbacks"):
            comfy.patcher_extension.merge_nested_dicts(options.setdefault(kind, {}), getattr(self.patcher, kind, {}),
                                                       copy_dict1=False)
        options.update(cond_or_uncond=[0], uuids=[None], sigmas=sigma)  # one chunk: the positive prompt
        conds = {**conds, "transformer_options": options}
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            return wrapper(self.base_model.apply_model, {"input": x, "timestep": sigma, "c": conds,
                                                          "cond_or_uncond": [0]})
        return self.base_model.apply_model(x, sigma, **conds)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3] of model-space latents, quantized as SaveImage does."""
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        latents = self.base_model.process_latent_out(x.detach().float().cpu())
        if self.decode_autocast is None:
            images = self.vae.decode(latents)
        else:
            device_type = torch.device(getattr(self.vae, "device", "cpu")).type
            with torch.autocast(device_type, dtype=self.decode_autocast):
                images = self.vae.decode(latents)
        images = images.reshape(-1, *images.shape[-3:])  # video VAEs add a frame axis
        return to_uint8(images)

    # --- export ---------------------------------------------------------------------------------------------------
    def export_lora(self, lora_path: str | Path) -> Path:
        """Write the run's LoRA beside ``lora_path`` in ComfyUI's native format (lora_comfyui.safetensors, for
        LoraLoaderModelOnly, with the run's config.json in its metadata as 'sfgrpo_config' when there is one) and,
        for SD3/SD3.5 and FLUX, in diffusers' (lora_diffusers.safetensors, for ``pipeline.load_lora_weights``).
        Returns the ComfyUI file's path.

        Raises:
            ValueError: when a trained module has no diffusers counterpart (the ComfyUI file is written first).
        """
        state, metadata = read_lora(lora_path)
        native = peft_to_comfyui_native(state, float(metadata["alpha"]) / int(metadata["rank"]))
        target = Path(lora_path).with_name(COMFYUI_LORA_FILE)
        metadata = {"format": "comfyui"}
        config_file = target.with_name("config.json")
        if config_file.is_file():
            metadata["sfgrpo_config"] = json.dumps(json.loads(config_file.read_text()))
        atomic_save_safetensors(native, target, metadata)
        architecture = ARCHITECTURES.get(type(self.module).__name__)
        if architecture is not None:
            atomic_save_safetensors(comfyui_to_diffusers(native, architecture),
                                    target.with_name("lora_diffusers.safetensors"), {"format": "diffusers"})
        return target

    # --- conditioning ---------------------------------------------------------------------------------------------
    def _model_cond(self, prompt: int) -> dict[str, Any]:
        """ComfyUI's model inputs for one prompt (model.extra_conds, as its samplers build them), cached."""
        if prompt not in self._model_conds:
            conditioning = self.prompts.conditionings[prompt]
            context, extras = conditioning[0][0], dict(conditioning[0][1])
            noise = torch.zeros(1, *self.sample_shape)
            with torch.inference_mode(False):
                conds = self.base_model.extra_conds(cross_attn=context.clone(), device=self.device, noise=noise,
                                                    **{k: _clone(v) for k, v in extras.items()})
            self._model_conds[prompt] = {name: cond.cond for name, cond in conds.items()}
        return self._model_conds[prompt]

    def _rows_by_shape(self, index: list[int]) -> list[list[int]]:
        """Row groups whose prompts give conditioning tensors of equal shapes (so they stack)."""
        groups: dict[tuple, list[int]] = {}
        for row, prompt in enumerate(index):
            signature = tuple((name, tuple(value.shape) if torch.is_tensor(value) else repr(value))
                              for name, value in sorted(self._model_cond(prompt).items()))
            groups.setdefault(signature, []).append(row)
        return list(groups.values())

    def _batched_conds(self, prompts: list[int], like: torch.Tensor) -> dict[str, Any]:
        first = self._model_cond(prompts[0])
        batched: dict[str, Any] = {}
        for name, value in first.items():
            if torch.is_tensor(value):
                rows = [_first_row(self._model_cond(prompt)[name]) for prompt in prompts]
                batched[name] = torch.cat(rows).to(like.device)
            else:
                batched[name] = value
        return batched


def _first_row(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:1] if tensor.dim() > 0 else tensor.reshape(1)


def _clone(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


class _OutOfPlaceAdds(torch.overrides.TorchFunctionMode):
    """``x += y`` as ``x = x + y`` while a block trains: ComfyUI's FLUX blocks add their residuals in place into a
    tensor their norm saved for the backward pass, which autograd refuses. ``+=`` rebinds the name to what
    ``__iadd__`` returns, so a new tensor has the same meaning (``t[i] += y`` still writes into ``t``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") == "add_":  # what `x += y` dispatches
            return torch.add(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def checkpointed_blocks(module: nn.Module) -> Iterator[int]:
    """Gradient checkpointing of the model's transformer blocks (each element of its top-level ModuleLists), as
    ComfyUI's own TrainLoraNode does: activations are recomputed in the backward pass instead of kept (the
    gradients are the same). While a block trains, ``+=`` is out of place (``_OutOfPlaceAdds``), so the in-place
    residual adds of ComfyUI's FLUX blocks (``x += ...`` after a norm that saved x) train. Yields how many blocks
    are wrapped; their forwards are restored on exit."""
    blocks = [block for child in module.children() if isinstance(child, nn.ModuleList) for block in child]
    for block in blocks:
        original = block.forward

        def run(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with _OutOfPlaceAdds():
                return _original(*args, **kwargs)

        def forward(*args: Any, _original: Any = original, _run: Any = run, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_run, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward is back


@contextlib.contextmanager
def trainable(model: ComfyFlowModel) -> Iterator[ComfyFlowModel]:
    """Training mode for a ComfyUI model: inference mode off, gradients on, ordinary tensors for the frozen
    weights, transformer blocks checkpointed; the LoRA adapters the trainer injects are removed on exit (also after
    an error or a Cancel)."""
    with torch.inference_mode(False), torch.enable_grad(), checkpointed_blocks(model.module):
        make_parameters_trainable_safe(model.module)
        try:
            yield model
        finally:
            detach_lora(model.module)
            model.module.requires_grad_(False)
