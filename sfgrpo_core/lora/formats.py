"""LoRA files: the trainer's peft-keyed adapters in diffusers' format, and ComfyUI's native format.

The trainer stores '<module>.lora_A.weight' [r, in] and '<module>.lora_B.weight' [out, r], with the update scaled by
alpha / r (sfgrpo_core.lora). Two cases:
- Adapters on a diffusers transformer (the core's diffusers and mini-world backends): one file in diffusers' format,
  the same keys under 'transformer.' with alpha / r folded into lora_B so that no alpha is needed (``to_diffusers``,
  ``export_lora``). ``pipeline.load_lora_weights`` reads it, and so do ComfyUI's stock LoRA loaders
  (LoraLoaderModelOnly), unchanged: ComfyUI 0.3.75 maps diffusers' SD3 and FLUX module names onto its own
  (comfy/lora.py model_lora_keys_unet, through comfy/utils.py mmdit_to_diffusers / flux_to_diffusers), q, k, v (and
  FLUX's proj_mlp) onto their row ranges of the fused qkv / linear1 Linears. tests/comfy/test_train_node.py checks
  it: no key left unloaded, the same weights and velocities as the adapters in diffusers.
- Adapters on ComfyUI's own modules (the ComfyUI node's runs): ComfyUI's native format, as its SaveLoRA writes it
  (``peft_to_comfyui_native``), and that LoRA in diffusers' keys (``comfyui_to_diffusers``), which splits an adapter
  of a fused Linear into one adapter per diffusers projection. The module correspondence is read from ComfyUI's
  comfy/utils.py (mmdit_to_diffusers, flux_to_diffusers, 0.3.75) and comfy/ldm/flux/layers.py; ComfyUI is not
  imported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors
from .adapters import read_lora

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_NATIVE_SUFFIXES = (".lora_down.weight", ".lora_up.weight")  # ComfyUI's names of lora_A and lora_B

# Block-relative diffusers module -> (ComfyUI module, index of the part in a fused Linear or None), for
# ``diffusers_modules``. Adaptive-norm modulation layers are not mapped (ComfyUI reorders some of their rows).
_SD3_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
}
_FLUX_DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
}
_FLUX_SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None),
}
# (diffusers block list, ComfyUI block list, block table) per architecture.
_BLOCKS = {
    "sd3": (("transformer_blocks", "joint_blocks", _SD3_BLOCK),),
    "flux": (("transformer_blocks", "double_blocks", _FLUX_DOUBLE_BLOCK),
             ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE_BLOCK)),
}
_MODULE = re.compile(r"^(\w+)\.(\d+)\.(.+)$")


def lora_modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A [r, in], B [out, r])} of a peft-keyed LoRA state. Raises ValueError on unpaired or other keys."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((suffix for suffix in _SUFFIXES if key.endswith(suffix)), None)
        if suffix is None:
            raise ValueError(f"{key!r} is not a peft LoRA key ('<module>.lora_A.weight' / '.lora_B.weight')")
        modules.setdefault(key[: -len(suffix)], {})[suffix] = tensor
    unpaired = sorted(name for name, pair in modules.items() if len(pair) != 2)
    if unpaired:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {unpaired[:5]}")
    return {name: (pair[_SUFFIXES[0]], pair[_SUFFIXES[1]]) for name, pair in sorted(modules.items())}


def to_diffusers(state: Mapping[str, torch.Tensor], alpha: float, rank: int,
                 prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """'<prefix>.<module>.lora_A.weight' = A and '.lora_B.weight' = B * alpha / rank, for diffusers' loaders.

    Args:
        state: peft-keyed LoRA weights (sfgrpo_core.lora.lora_state_dict).
        alpha, rank: the training LoRA's alpha and r (its update is B A * alpha / rank).
        prefix: the pipeline component ('transformer'); '' for bare module keys.
    """
    scale = alpha / rank
    head = f"{prefix}." if prefix else ""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in lora_modules(state).items():
        out[f"{head}{module}.lora_A.weight"] = down.clone()
        out[f"{head}{module}.lora_B.weight"] = up * scale
    return out


def peft_to_comfyui_native(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """peft adapters on ComfyUI's own modules -> ComfyUI's native LoRA, as the stock SaveLoRA writes it and
    LoraLoaderModelOnly reads it.

    Args:
        state: '<module>.lora_A.weight' [r, in] and '.lora_B.weight' [out, r] under the names of ComfyUI's diffusion
            model (e.g. 'joint_blocks.0.x_block.attn.qkv'), as sfgrpo_core.lora.lora_state_dict gives them.
        scale: the adapters' scale alpha / r (ComfyUI scales by alpha / rank, as peft does; a fused module's adapter
            has rank r x parts, see sfgrpo_core.lora.attach_lora, so its alpha is this scale times its own rank).

    Returns:
        'diffusion_model.<module>.lora_down.weight' = A, '.lora_up.weight' = B (float32, CPU) and '.alpha' (0-d
        float32) for every module, sorted by key.
    """
    native: dict[str, torch.Tensor] = {}
    for module, pair in lora_modules(state).items():
        key = f"diffusion_model.{module}"
        for suffix, tensor in zip(_NATIVE_SUFFIXES, pair, strict=True):
            native[f"{key}{suffix}"] = tensor.detach().float().contiguous().cpu()
        native[f"{key}.alpha"] = torch.tensor(scale * pair[0].shape[0], dtype=torch.float32)
    return dict(sorted(native.items()))


def diffusers_modules(architecture: str, module: str) -> list[tuple[str, int | None]]:
    """The diffusers modules behind a ComfyUI module, with their part index in it (None for an unfused Linear).

    Example: ('sd3', 'joint_blocks.0.x_block.attn.qkv') -> [('transformer_blocks.0.attn.to_q', 0), (..to_k, 1),
    (..to_v, 2)]. Raises ValueError for a module it does not map.
    """
    if architecture not in _BLOCKS:
        raise ValueError(f"architecture: {architecture!r} is not 'sd3' or 'flux'")
    match = _MODULE.match(module)
    found = []
    for diffusers_blocks, comfy_blocks, table in _BLOCKS[architecture]:
        if match and match.group(1) == comfy_blocks:
            found += [(f"{diffusers_blocks}.{match.group(2)}.{name}", part)
                      for name, (comfy_name, part) in table.items() if comfy_name == match.group(3)]
    if not found:
        raise ValueError(f"LoRA module {module!r} has no diffusers {architecture} counterpart here")
    return sorted(found, key=lambda item: -1 if item[1] is None else item[1])


def comfyui_to_diffusers(native: Mapping[str, torch.Tensor], architecture: str,
                         prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """ComfyUI's native LoRA (as ``peft_to_comfyui_native`` or ComfyUI's own trainer node write it) in diffusers'
    keys.

    Each adapter's scale alpha / r is folded into lora_B (diffusers then needs no alpha). A fused Linear (q/k/v, FLUX's
    linear1) is split exactly: every part takes its own rows of lora_up and the whole lora_down, or, when lora_up is
    block-diagonal over the parts (the trainer's fused adapters, one rank-r adapter per part), only its own block
    of rank r. The parts are equal thirds of a qkv, and 3 x hidden + 4 x hidden rows of FLUX's linear1.
    """
    head = f"{prefix}." if prefix else ""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(native):
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[: -len(".lora_down.weight")]
        down, up = native[key], native[f"{module}.lora_up.weight"]
        alpha = native.get(f"{module}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        name = module.removeprefix("diffusion_model.")
        targets = diffusers_modules(architecture, name)
        if targets[0][1] is None:
            sizes: tuple[int, ...] = (up.shape[0],)
        elif name.endswith("linear1"):
            hidden = up.shape[0] // 7
            sizes = (hidden, hidden, hidden, 4 * hidden)
        else:
            sizes = (up.shape[0] // 3,) * 3
        blocks = _diagonal_blocks(up, sizes)
        for diffusers_name, part in targets:
            index = 0 if part is None else part
            rows = slice(sum(sizes[:index]), sum(sizes[: index + 1]))
            columns = slice(None) if blocks is None else blocks[index]
            out[f"{head}{diffusers_name}.lora_A.weight"] = down[columns].clone()
            out[f"{head}{diffusers_name}.lora_B.weight"] = up[rows, columns] * scale
    return out


def _diagonal_blocks(up: torch.Tensor, sizes: Sequence[int]) -> list[slice] | None:
    """The rank columns of each part when ``up`` [sum(sizes), rank] is block-diagonal over more than one part (part
    i's rows are zero outside columns i*rank/parts..(i+1)*rank/parts), else None."""
    parts = len(sizes)
    if parts == 1 or up.shape[1] % parts:
        return None
    width = up.shape[1] // parts
    blocks = [slice(i * width, (i + 1) * width) for i in range(parts)]
    start = 0
    for size, block in zip(sizes, blocks, strict=True):
        outside = up[start : start + size].clone()
        outside[:, block] = 0
        if outside.any():
            return None
        start += size
    return blocks


def export_lora(lora_path: str | Path, output_path: str | Path) -> Path:
    """Write a LoRA file of the trainer (sfgrpo_core.lora.save_lora, on a diffusers transformer) in diffusers' format,
    atomically: for ``pipeline.load_lora_weights(output_path)`` and, as it is, for ComfyUI's models/loras folder and
    its stock LoRA loaders (SD3/SD3.5 and FLUX; see the module docstring). Returns ``output_path``.
    """
    state, metadata = read_lora(lora_path)
    tensors = to_diffusers(state, float(metadata["alpha"]), int(metadata["rank"]))
    atomic_save_safetensors(tensors, output_path, {"format": "diffusers"})
    return Path(output_path)
