"""LoRA export: the trainer's peft-keyed adapters in diffusers' and ComfyUI's formats.

The trainer stores '<module>.lora_A.weight' [r, in] and '<module>.lora_B.weight' [out, r] under diffusers module
names, with the update scaled by alpha / r (sfgrpo_core.lora). Two targets:
- diffusers (``load_lora_weights`` / ``transformer.load_lora_adapter``): the same keys under 'transformer.'. Those
  loaders (and ComfyUI reading this format) assume lora_alpha = r unless told otherwise, so alpha / r is folded into
  lora_B and the file needs no alpha at all.
- ComfyUI's native format, as its SaveLoRA writes it: 'diffusion_model.<module>.lora_up.weight' [out, R],
  '.lora_down.weight' [R, in] and '.alpha' (0-d float32; ComfyUI scales by alpha / R) under ComfyUI's own MMDiT /
  Flux module names. ComfyUI fuses q, k, v (and, in FLUX single blocks, the MLP input) into one Linear, so their
  adapters are combined exactly: down = cat of the parts' A, up = block-diagonal of their B (zero rows for fused
  parts without an adapter), R = the sum of the parts' ranks and alpha scaled by R / r to keep the scale alpha / r.

The module correspondence is read from ComfyUI's comfy/utils.py (mmdit_to_diffusers, flux_to_diffusers, 0.3.75)
and comfy/ldm/flux/layers.py; ComfyUI is not imported. Adaptive-norm modulation layers are not mapped (ComfyUI
reorders some of their rows) and raise ValueError, like any module without a ComfyUI counterpart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save_safetensors
from .adapters import read_lora

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# Block-relative diffusers module -> (ComfyUI module, index of the part in a fused Linear or None).
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


def fused_part_sizes(architecture: str, transformer_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Output sizes of the parts of ComfyUI's fused Linears, by block-relative ComfyUI module name.

    SD3: qkv = 3 x hidden; FLUX: qkv = 3 x hidden, single-block linear1 = 3 x hidden + the MLP input (4 x hidden),
    hidden = num_attention_heads * attention_head_dim of the diffusers transformer config.
    """
    hidden = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    qkv = (hidden, hidden, hidden)
    if architecture == "sd3":
        return {"x_block.attn.qkv": qkv, "context_block.attn.qkv": qkv, "x_block.attn2.qkv": qkv}
    if architecture == "flux":
        return {"img_attn.qkv": qkv, "txt_attn.qkv": qkv, "linear1": (*qkv, 4 * hidden)}
    raise ValueError(f"architecture: {architecture!r} is not 'sd3' or 'flux'")


def comfyui_module(architecture: str, module: str) -> tuple[str, int | None]:
    """ComfyUI's name for a diffusers transformer module, and its part index in a fused Linear (None if unfused).

    Example: ('sd3', 'transformer_blocks.0.attn.to_k') -> ('joint_blocks.0.x_block.attn.qkv', 1).

    Raises:
        ValueError: for a module without a ComfyUI counterpart in this mapping.
    """
    if architecture not in _BLOCKS:
        raise ValueError(f"architecture: {architecture!r} is not 'sd3' or 'flux'")
    match = _MODULE.match(module)
    for diffusers_blocks, comfy_blocks, table in _BLOCKS[architecture]:
        if match and match.group(1) == diffusers_blocks and match.group(3) in table:
            name, part = table[match.group(3)]
            return f"{comfy_blocks}.{match.group(2)}.{name}", part
    raise ValueError(f"LoRA module {module!r} has no ComfyUI {architecture} counterpart here; adapt only attention "
                     "and MLP projections of the blocks")


def to_comfyui(state: Mapping[str, torch.Tensor], alpha: float, rank: int, architecture: str,
               transformer_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """ComfyUI's native LoRA ('diffusion_model.<module>.lora_up.weight', '.lora_down.weight', '.alpha').

    Args:
        state: peft-keyed LoRA weights of an SD3Transformer2DModel or FluxTransformer2DModel.
        alpha, rank: the training LoRA's alpha and r.
        architecture: 'sd3' or 'flux'.
        transformer_config: the diffusers transformer's config (num_attention_heads, attention_head_dim), for the
            sizes of fused parts that have no adapter.

    Returns:
        float tensors in the state's dtype; each '.alpha' is 0-d float32, alpha * R / rank for a Linear whose
        combined adapter has rank R, so ComfyUI's scale alpha / R equals the training scale alpha / rank.
    """
    sizes = fused_part_sizes(architecture, transformer_config)
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in lora_modules(state).items():
        name, part = comfyui_module(architecture, module)
        if part is None:
            adapters[name] = pair
        else:
            fused.setdefault(name, {})[part] = pair
    for name, parts in fused.items():
        adapters[name] = fuse_parts(parts, sizes[name.split(".", 2)[2]])
    out: dict[str, torch.Tensor] = {}
    for name, (down, up) in sorted(adapters.items()):
        key = f"diffusion_model.{name}"
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.alpha"] = torch.tensor(alpha * down.shape[0] / rank, dtype=torch.float32)
    return out


def diffusers_modules(architecture: str, module: str) -> list[tuple[str, int | None]]:
    """The diffusers modules behind a ComfyUI module, with their part index in it (None for an unfused Linear).

    Example: ('sd3', 'joint_blocks.0.x_block.attn.qkv') -> [('transformer_blocks.0.attn.to_q', 0), (..to_k, 1),
    (..to_v, 2)]. The inverse of ``comfyui_module``; raises ValueError for a module it does not map.
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
    """ComfyUI's native LoRA (as ``to_comfyui`` or the ComfyUI trainer node write it) in diffusers' keys.

    Each adapter's scale alpha / r is folded into lora_B (diffusers then needs no alpha). A fused Linear (q/k/v, FLUX's
    linear1) is split exactly: every part keeps the whole lora_down and takes its own rows of lora_up; the parts are
    equal thirds of a qkv, and 3 x hidden + 4 x hidden rows of FLUX's linear1.
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
        for diffusers_name, part in targets:
            index = 0 if part is None else part
            row = sum(sizes[:index])
            out[f"{head}{diffusers_name}.lora_A.weight"] = down.clone()
            out[f"{head}{diffusers_name}.lora_B.weight"] = up[row : row + sizes[index]] * scale
    return out


def fuse_parts(parts: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
               part_sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter for a Linear whose output stacks parts of ``part_sizes`` rows, from adapters of some parts.

    Args:
        parts: {part index: (A [r_i, in], B [size_i, r_i])}.

    Returns:
        (down [sum r_i, in] = cat of the A_i in part order, up [sum(part_sizes), sum r_i] block-diagonal in the B_i,
        zero elsewhere), so that up @ down stacks B_i A_i at each part's rows and zeros at parts without an adapter.
    """
    order = sorted(parts)
    down = torch.cat([parts[index][0] for index in order])
    up = down.new_zeros(sum(part_sizes), down.shape[0])
    column = 0
    for index in order:
        part_up = parts[index][1]
        row = sum(part_sizes[:index])
        if part_up.shape[0] != part_sizes[index]:
            raise ValueError(f"fused part {index} has {part_up.shape[0]} output rows, expected {part_sizes[index]}: "
                             "does transformer_config belong to this LoRA?")
        up[row : row + part_up.shape[0], column : column + part_up.shape[1]] = part_up
        column += part_up.shape[1]
    return down, up


def export_lora(lora_path: str | Path, output_path: str | Path, *, format: str, architecture: str = "",
                transformer_config: Mapping[str, Any] | None = None) -> Path:
    """Convert a LoRA file written by the trainer (sfgrpo_core.lora.save_lora) to ``format``, atomically.

    Args:
        format: 'diffusers' (load with ``pipeline.load_lora_weights(output_path)``) or 'comfyui' (a file for
            ComfyUI's models/loras folder and LoraLoaderModelOnly).
        architecture, transformer_config: required for 'comfyui' (see ``to_comfyui``).
    """
    state, metadata = read_lora(lora_path)
    alpha, rank = float(metadata["alpha"]), int(metadata["rank"])
    if format == "diffusers":
        tensors = to_diffusers(state, alpha, rank)
    elif format == "comfyui":
        if transformer_config is None:
            raise ValueError("transformer_config is required for the 'comfyui' format")
        tensors = to_comfyui(state, alpha, rank, architecture, transformer_config)
    else:
        raise ValueError(f"format: {format!r} is not 'diffusers' or 'comfyui'")
    atomic_save_safetensors(tensors, output_path, {"format": format})
    return Path(output_path)
