"""LoRA file formats: diffusers' keys (alpha folded, diffusers' own loader), ComfyUI's native keys of adapters on
ComfyUI modules, and their exact split into diffusers modules. That ComfyUI's stock loader reads the diffusers file
is checked against a real ComfyUI in tests/comfy/test_train_node.py."""

import pytest
import tiny_models as tiny
import torch
from safetensors import safe_open

from sfgrpo_core.lora.adapters import attach_lora, block_diagonal_mask, lora_state_dict, save_lora
from sfgrpo_core.lora.formats import (
    comfyui_to_diffusers,
    diffusers_modules,
    export_lora,
    peft_to_comfyui_native,
    to_diffusers,
)

HIDDEN = 16
CONFIG = {"num_attention_heads": 2, "attention_head_dim": HIDDEN // 2}
RANK, ALPHA = 2, 6.0


def _state(modules, generator):
    """Random peft-keyed LoRA weights for Linear(HIDDEN -> out) modules given as {name: out}."""
    state = {}
    for name, out in modules.items():
        state[f"{name}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator)
        state[f"{name}.lora_B.weight"] = torch.randn(out, RANK, generator=generator)
    return state


def _delta(state, name):
    """The training update of module ``name``: B A alpha / rank."""
    return state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"] * ALPHA / RANK


def _comfy_delta(tensors, name):
    """The update ComfyUI applies to ``name``: up down alpha / R, R = down's rank."""
    up, down = tensors[f"diffusion_model.{name}.lora_up.weight"], tensors[f"diffusion_model.{name}.lora_down.weight"]
    return up @ down * tensors[f"diffusion_model.{name}.alpha"] / down.shape[0]


def test_peft_to_comfyui_native_keys_alpha_and_updates():
    """peft adapters on ComfyUI's module names -> the keys ComfyUI's SaveLoRA writes, with the training updates."""
    modules = {"joint_blocks.0.x_block.attn.qkv": 3 * HIDDEN, "joint_blocks.0.x_block.attn.proj": HIDDEN}
    state = {key: value.double() for key, value in _state(modules, torch.Generator().manual_seed(0)).items()}
    native = peft_to_comfyui_native(state, ALPHA / RANK)
    assert list(native) == sorted(f"diffusion_model.{name}.{suffix}" for name in modules
                                  for suffix in ("lora_up.weight", "lora_down.weight", "alpha"))
    assert all(tensor.dtype == torch.float32 for tensor in native.values())
    alpha = native["diffusion_model.joint_blocks.0.x_block.attn.proj.alpha"]
    assert alpha.ndim == 0 and float(alpha) == ALPHA
    for name in modules:
        torch.testing.assert_close(_comfy_delta(native, name), _delta(state, name).float())
    with pytest.raises(ValueError, match="not a peft LoRA key"):
        peft_to_comfyui_native({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, ALPHA / RANK)


def test_to_diffusers_folds_alpha_and_diffusers_loader_reproduces_the_outputs(tmp_path):
    transformer = tiny.tiny_sd3_transformer()
    attach_lora(transformer, rank=RANK, alpha=ALPHA, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    state = lora_state_dict(transformer)
    converted = to_diffusers(state, ALPHA, RANK)
    assert sorted(converted) == sorted(f"transformer.{key}" for key in state)
    key = "transformer_blocks.0.attn.to_q.lora_B.weight"
    torch.testing.assert_close(converted[f"transformer.{key}"], state[key] * ALPHA / RANK)

    fresh = tiny.tiny_sd3_transformer()
    fresh.load_lora_adapter(converted, prefix="transformer")
    inputs = dict(hidden_states=torch.randn(2, 16, 8, 8), timestep=torch.tensor([300.0, 900.0]),
                  encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 32),
                  return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs)[0], transformer(**inputs)[0])

    trained = save_lora(tmp_path / "lora.safetensors", transformer, rank=RANK, alpha=ALPHA, target_modules=["to_q"])
    path = export_lora(trained, tmp_path / "diffusers.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "diffusers"}
        assert sorted(handle.keys()) == sorted(f"transformer.{key}" for key in lora_state_dict(transformer))


@pytest.mark.parametrize("architecture, modules", [
    ("sd3", {"joint_blocks.2.x_block.attn.qkv": 3 * HIDDEN, "joint_blocks.2.x_block.attn.proj": HIDDEN,
             "joint_blocks.2.context_block.attn.qkv": 3 * HIDDEN}),
    ("flux", {"single_blocks.1.linear1": 7 * HIDDEN, "single_blocks.1.linear2": HIDDEN,
              "double_blocks.0.img_attn.proj": HIDDEN, "double_blocks.0.txt_attn.qkv": 3 * HIDDEN}),
])
def test_comfyui_to_diffusers_splits_fused_adapters_exactly(architecture, modules):
    """An adapter on ComfyUI's fused Linear splits into diffusers modules whose updates are its rows: q, k, v thirds
    of a qkv; q, k, v, then the 4 x hidden MLP input in FLUX's linear1."""
    native = peft_to_comfyui_native(_state(modules, torch.Generator().manual_seed(2)), ALPHA / RANK)
    back = comfyui_to_diffusers(native, architecture)
    parts = [(target, name, part) for name in modules for target, part in diffusers_modules(architecture, name)]
    assert sorted(back) == sorted(f"transformer.{target}.lora_{ab}.weight" for target, _, _ in parts for ab in "AB")
    for target, name, part in parts:
        row, rows = (part or 0) * HIDDEN, 4 * HIDDEN if part == 3 else HIDDEN
        update = back[f"transformer.{target}.lora_B.weight"] @ back[f"transformer.{target}.lora_A.weight"]
        torch.testing.assert_close(update, _comfy_delta(native, name)[row : row + rows])
    if architecture == "flux":
        assert ("single_transformer_blocks.1.proj_mlp", 3) in diffusers_modules("flux", "single_blocks.1.linear1")


def test_diffusers_modules_names():
    assert diffusers_modules("sd3", "joint_blocks.0.x_block.attn.qkv") == [
        ("transformer_blocks.0.attn.to_q", 0), ("transformer_blocks.0.attn.to_k", 1),
        ("transformer_blocks.0.attn.to_v", 2)]
    assert diffusers_modules("sd3", "joint_blocks.3.context_block.attn.proj") == [
        ("transformer_blocks.3.attn.to_add_out", None)]
    assert diffusers_modules("flux", "double_blocks.2.img_attn.proj") == [("transformer_blocks.2.attn.to_out.0", None)]
    with pytest.raises(ValueError, match="no diffusers sd3 counterpart"):
        diffusers_modules("sd3", "joint_blocks.0.x_block.adaLN_modulation.1")
    with pytest.raises(ValueError, match="architecture"):
        diffusers_modules("kohya", "joint_blocks.0.x_block.attn.qkv")


def test_block_diagonal_fused_adapter_splits_into_rank_r_parts():
    """The trainer's fused adapters (one rank-r adapter per projection, lora_B block-diagonal, alpha x parts) are
    written with their own alpha and split back into rank-r diffusers adapters with the same updates."""
    generator = torch.Generator().manual_seed(3)
    sizes = (HIDDEN, HIDDEN, HIDDEN)
    up = torch.randn(3 * HIDDEN, 3 * RANK, generator=generator) * block_diagonal_mask(sizes, RANK)
    state = {"joint_blocks.1.x_block.attn.qkv.lora_A.weight": torch.randn(3 * RANK, HIDDEN, generator=generator),
             "joint_blocks.1.x_block.attn.qkv.lora_B.weight": up}
    native = peft_to_comfyui_native(state, ALPHA / RANK)
    assert float(native["diffusion_model.joint_blocks.1.x_block.attn.qkv.alpha"]) == 3 * ALPHA
    back = comfyui_to_diffusers(native, "sd3")
    for part, projection in enumerate(("to_q", "to_k", "to_v")):
        down = back[f"transformer.transformer_blocks.1.attn.{projection}.lora_A.weight"]
        lifted = back[f"transformer.transformer_blocks.1.attn.{projection}.lora_B.weight"]
        assert down.shape == (RANK, HIDDEN) and lifted.shape == (HIDDEN, RANK)
        rows = slice(part * HIDDEN, (part + 1) * HIDDEN)
        torch.testing.assert_close(lifted @ down, _comfy_delta(native, "joint_blocks.1.x_block.attn.qkv")[rows])
    up[0, -1] = 1.0  # no longer block-diagonal: every part keeps the whole rank
    back = comfyui_to_diffusers(peft_to_comfyui_native(state, ALPHA / RANK), "sd3")
    assert back["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"].shape == (3 * RANK, HIDDEN)
