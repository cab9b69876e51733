"""LoRA adapters through peft on any nn.Module, their safetensors files, and the reference policy switch.

The reference policy of the KL penalty is the base model, obtained by switching the adapter off: no second copy
of the weights is kept.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..atomic import atomic_save_safetensors

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "default"
FORMAT = "sfgrpo-peft-lora"


def attach_lora(module: nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str], seed: int = 0,
                fused: Mapping[str, Sequence[int]] | None = None) -> list[nn.Parameter]:
    """Inject LoRA adapters (B initialised to 0, so the policy starts as the base model) and freeze the rest.

    Args:
        module: the network; modified in place.
        rank, alpha: LoRA rank r and alpha (the update is scaled by alpha / r).
        target_modules: names (or name suffixes) of the Linear layers to adapt.
        seed: seeds the A matrices, without touching the global RNG.
        fused: {module name: row sizes of the projections it stacks} for fused Linears (ComfyUI's q/k/v). Each
            projection gets its own rank-r adapter, as if it were a Linear of its own: the layer gets rank
            r x parts and alpha x parts (the same scale alpha / r) with lora_B kept block-diagonal (its gradient is
            masked, and B starts at 0), so a fused model trains the parametrization of an unfused one.

    Returns:
        The trainable LoRA parameters.

    Raises:
        ValueError: naming the targets when none of them matches a module.
    """
    from peft import LoraConfig, inject_adapter_in_model

    fused = dict(fused or {})
    # peft annotates lora_alpha as int, but only ever divides by it (scaling = alpha / r), so a float alpha works.
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),  # type: ignore[arg-type]
                        lora_dropout=0.0,
                        rank_pattern={re.escape(name): rank * len(sizes) for name, sizes in fused.items()},
                        alpha_pattern={re.escape(name): alpha * len(sizes) for name, sizes in fused.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as error:
            raise ValueError(f"lora.target_modules {list(target_modules)} match no layer of the model: "
                             f"{error}") from None
    parameters = []
    for name, parameter in module.named_parameters():
        is_lora = "lora_" in name
        parameter.requires_grad_(is_lora)
        if is_lora:
            # Adapters train in float32 even on a bf16/fp16 base (peft casts activations to the adapter's dtype).
            parameter.data = parameter.data.float()
            parameters.append(parameter)
    tuners = {name: layer for name, layer in module.named_modules() if name in fused and _is_tuner(layer)}
    for name, layer in tuners.items():
        up = layer.lora_B[ADAPTER].weight  # type: ignore[index]
        mask = block_diagonal_mask(fused[name], rank).to(up.device)
        if up.shape != mask.shape:
            raise ValueError(f"fused module {name!r}: parts {list(fused[name])} do not fit its lora_B "
                             f"{list(up.shape)}")
        up.register_hook(functools.partial(torch.mul, mask))
    return parameters


def block_diagonal_mask(sizes: Sequence[int], rank: int) -> torch.Tensor:
    """[sum(sizes), rank * len(sizes)] float32: 1 where rows of part i meet rank columns i*r..(i+1)*r, else 0."""
    rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    columns = torch.arange(rank * len(sizes)) // rank
    return (rows[:, None] == columns[None, :]).float()


def _is_tuner(layer: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(layer, BaseTunerLayer)


def _tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    return [layer for layer in module.modules() if _is_tuner(layer)]  # type: ignore[misc]


@contextlib.contextmanager
def adapter_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block the module computes the base (reference) policy."""
    layers = _tuner_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def detach_lora(module: nn.Module) -> None:
    """Remove every adapter ``attach_lora`` injected, putting each wrapped layer's base layer back in place.

    For front ends that train a model they do not own (ComfyUI's MODEL): the module is left as it was before
    ``attach_lora``, its base weights untouched.
    """
    wrapped = [(name, layer) for name, layer in module.named_modules() if _is_tuner(layer)]
    for name, layer in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key format ('<module>.lora_A.weight', ...), whole tensors.

    On a model sharded with FSDP (train.sharding fsdp) the shards are gathered: a collective that every process
    calls."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()
            for name, tensor in state.items()}


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by ``lora_state_dict``; raises ValueError on missing or unexpected keys."""
    expected = set(lora_state_dict(module))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"LoRA weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    from peft import set_peft_model_state_dict

    from ..training.distributed import shard_like

    parameters = dict(module.named_parameters())
    # A sharded model (train.sharding fsdp) takes each whole tensor cut the way its parameter is.
    state = {name: shard_like(tensor, parameters.get(_parameter_name(name), tensor)) for name, tensor in state.items()}
    set_peft_model_state_dict(module, state, adapter_name=ADAPTER)


def _parameter_name(key: str) -> str:
    """The parameter behind a peft state-dict key: '<m>.lora_A.weight' -> '<m>.lora_A.default.weight'."""
    for part in (".lora_A.", ".lora_B."):
        key = key.replace(part, f"{part}{ADAPTER}.")
    return key


def save_lora(path: str | Path, module: nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str]) -> Path:
    """Write the adapter to ``path`` as safetensors (atomically), with rank/alpha/targets in its metadata."""
    return write_lora(path, lora_state_dict(module), rank=rank, alpha=alpha, target_modules=target_modules)


def write_lora(path: str | Path, weights: dict[str, torch.Tensor], *, rank: int, alpha: float,
               target_modules: Sequence[str]) -> Path:
    """Write adapter ``weights`` (``lora_state_dict``'s) to ``path`` as ``save_lora`` does."""
    metadata = {"format": FORMAT, "rank": str(rank), "alpha": str(alpha),
                "target_modules": json.dumps(list(target_modules))}
    atomic_save_safetensors(weights, path, metadata)
    return Path(path)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, metadata) of a LoRA file written by ``save_lora``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata
