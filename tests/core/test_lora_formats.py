"""LoRA export formats: exact weight deltas after fusing q/k/v for ComfyUI, key names, alpha, and diffusers' loader."""

import pytest
import tiny_models as tiny
import torch
from safetensors import safe_open

from sfgrpo_core.lora.adapters import attach_lora, lora_state_dict, save_lora
from sfgrpo_core.lora.formats import (
    comfyui_module,
    comfyui_to_diffusers,
    diffusers_modules,
    export_lora,
    to_comfyui,
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


def test_sd3_fused_qkv_reproduces_the_separate_q_k_v_updates_exactly():
    block = "transformer_blocks.1.attn"
    names = [f"{block}.{part}" for part in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj")]
    state = _state(dict.fromkeys(names, HIDDEN), torch.Generator().manual_seed(0))
    tensors = to_comfyui(state, ALPHA, RANK, "sd3", CONFIG)
    assert sorted(tensors) == sorted(f"diffusion_model.joint_blocks.1.{module}.{suffix}"
                                     for module in ("x_block.attn.qkv", "x_block.attn.proj", "context_block.attn.qkv")
                                     for suffix in ("lora_up.weight", "lora_down.weight", "alpha"))
    fused = _comfy_delta(tensors, "joint_blocks.1.x_block.attn.qkv")
    assert fused.shape == (3 * HIDDEN, HIDDEN)
    assert tensors["diffusion_model.joint_blocks.1.x_block.attn.qkv.lora_down.weight"].shape == (3 * RANK, HIDDEN)
    expected = torch.cat([_delta(state, f"{block}.{part}") for part in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(fused, expected)
    context = _comfy_delta(tensors, "joint_blocks.1.context_block.attn.qkv")  # k has no adapter: zero rows
    zeros = torch.zeros(HIDDEN, HIDDEN)
    torch.testing.assert_close(context, torch.cat([_delta(state, f"{block}.add_q_proj"), zeros,
                                                   _delta(state, f"{block}.add_v_proj")]))
    torch.testing.assert_close(_comfy_delta(tensors, "joint_blocks.1.x_block.attn.proj"),
                               _delta(state, f"{block}.to_out.0"))
    alphas = {key: value for key, value in tensors.items() if key.endswith(".alpha")}
    assert all(value.dtype == torch.float32 and value.ndim == 0 for value in alphas.values())
    assert float(alphas["diffusion_model.joint_blocks.1.x_block.attn.proj.alpha"]) == ALPHA
    assert float(alphas["diffusion_model.joint_blocks.1.x_block.attn.qkv.alpha"]) == 3 * ALPHA
    assert float(alphas["diffusion_model.joint_blocks.1.context_block.attn.qkv.alpha"]) == 2 * ALPHA


@pytest.mark.parametrize("with_mlp", [False, True])
def test_flux_single_block_linear1_fuses_qkv_and_the_mlp_input(with_mlp):
    block = "single_transformer_blocks.0"
    modules = {f"{block}.attn.to_q": HIDDEN, f"{block}.attn.to_k": HIDDEN, f"{block}.attn.to_v": HIDDEN,
               f"{block}.proj_out": HIDDEN, "transformer_blocks.0.attn.add_k_proj": HIDDEN}
    if with_mlp:
        modules[f"{block}.proj_mlp"] = 4 * HIDDEN
    state = _state(modules, torch.Generator().manual_seed(1))
    tensors = to_comfyui(state, ALPHA, RANK, "flux", CONFIG)
    linear1 = _comfy_delta(tensors, "single_blocks.0.linear1")
    assert linear1.shape == (7 * HIDDEN, HIDDEN)
    mlp = _delta(state, f"{block}.proj_mlp") if with_mlp else torch.zeros(4 * HIDDEN, HIDDEN)
    torch.testing.assert_close(linear1, torch.cat([*(_delta(state, f"{block}.attn.{part}")
                                                    for part in ("to_q", "to_k", "to_v")), mlp]))
    torch.testing.assert_close(_comfy_delta(tensors, "single_blocks.0.linear2"), _delta(state, f"{block}.proj_out"))
    txt = _comfy_delta(tensors, "double_blocks.0.txt_attn.qkv")
    torch.testing.assert_close(txt[HIDDEN : 2 * HIDDEN], _delta(state, "transformer_blocks.0.attn.add_k_proj"))
    assert not txt[:HIDDEN].any() and not txt[2 * HIDDEN :].any()


def test_comfyui_module_names():
    assert comfyui_module("sd3", "transformer_blocks.3.attn.to_add_out") == ("joint_blocks.3.context_block.attn.proj",
                                                                             None)
    assert comfyui_module("sd3", "transformer_blocks.0.attn2.to_v") == ("joint_blocks.0.x_block.attn2.qkv", 2)
    assert comfyui_module("flux", "transformer_blocks.2.attn.to_out.0") == ("double_blocks.2.img_attn.proj", None)
    assert comfyui_module("flux", "single_transformer_blocks.5.proj_mlp") == ("single_blocks.5.linear1", 3)
    for architecture, module in (("sd3", "transformer_blocks.0.norm1.linear"), ("flux", "proj_out"),
                                 ("sd3", "single_transformer_blocks.0.attn.to_q")):
        with pytest.raises(ValueError, match="no ComfyUI"):
            comfyui_module(architecture, module)


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
    path = export_lora(trained, tmp_path / "comfy.safetensors", format="comfyui", architecture="sd3",
                       transformer_config=transformer.config)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "comfyui"}
        assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight" in handle.keys()
    with pytest.raises(ValueError, match="format"):
        export_lora(trained, tmp_path / "x.safetensors", format="kohya")


@pytest.mark.parametrize("architecture, modules", [
    ("sd3", {f"transformer_blocks.2.attn.{part}": HIDDEN
             for part in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}),
    ("flux", {**{f"single_transformer_blocks.1.attn.{part}": HIDDEN for part in ("to_q", "to_k", "to_v")},
              "single_transformer_blocks.1.proj_mlp": 4 * HIDDEN, "single_transformer_blocks.1.proj_out": HIDDEN,
              "transformer_blocks.0.attn.to_out.0": HIDDEN}),
])
def test_comfyui_to_diffusers_gives_back_every_module_update(architecture, modules):
    """ComfyUI's fused adapters split back into diffusers modules with exactly the training updates."""
    state = _state(modules, torch.Generator().manual_seed(2))
    back = comfyui_to_diffusers(to_comfyui(state, ALPHA, RANK, architecture, CONFIG), architecture)
    assert sorted(back) == sorted(f"transformer.{name}.lora_{part}.weight" for name in modules for part in "AB")
    for name in modules:
        update = back[f"transformer.{name}.lora_B.weight"] @ back[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(update, _delta(state, name))


def test_diffusers_modules_inverts_comfyui_module():
    for module in ("transformer_blocks.3.attn.to_k", "transformer_blocks.0.attn.to_add_out"):
        name, part = comfyui_module("sd3", module)
        assert (module, part) in diffusers_modules("sd3", name)
    with pytest.raises(ValueError, match="no diffusers sd3 counterpart"):
        diffusers_modules("sd3", "joint_blocks.0.x_block.adaLN_modulation.1")
