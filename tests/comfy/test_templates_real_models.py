"""The real-model templates (workflows/api/train_lora_sd35_pickscore.json, train_lora_flux_ocr.json) run end to end
in ComfyUI's engine on random-initialised models written under the templates' own file names at ComfyUI's widths
(tests/template_models.py), with PickScore's real classes in models/rewards/ and the real OCR engine: one training
iteration, before/after sampling, scoring, and the LoRA through the stock loader with no key left unloaded.

What differs from the files, and why: sizes shrink (64 px, a group of 2, one iteration, two prompts), and the
text-encoder loader that brings T5-XXL (4.7B parameters: 9.5 GB and minutes per prompt on a CPU) is swapped for
ComfyUI's CLIP-only one: SD3.5 through DualCLIPLoader (clip_l + clip_g, type sd3: SD3 without T5, which ComfyUI
supports), FLUX through CLIPLoader (clip_l) with a FLUX whose text input is CLIP-L's width. The files as they are,
T5-XXL included, run on a GPU: tests/gpu/test_templates_gpu.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from template_models import write_flux_files, write_sd35_files

API_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "api"
TEMPLATES = ("train_lora_sd35_pickscore", "train_lora_flux_ocr")
SMALL_TRAINING = dict(width=64, height=64, group_size=2, groups_per_iteration=1, iterations=1, steps=3, substeps=1,
                      eval_samples=1, eval_every=1, checkpoint_every=1, micro_batch_size=0)
MODEL_FOLDERS = ("checkpoints", "text_encoders", "diffusion_models", "vae", "rewards")

pytestmark = pytest.mark.slow


def template(name: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())


def for_this_machine(graph: dict, run_name: str) -> dict:
    """The template at test size, its T5-bearing text-encoder loader swapped for ComfyUI's CLIP-only one."""
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "TripleCLIPLoader":
            node.update(class_type="DualCLIPLoader", inputs={
                "clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sd3"})
        elif kind == "DualCLIPLoader" and inputs["type"] == "flux":
            node.update(class_type="CLIPLoader", inputs={"clip_name": "clip_l.safetensors",
                                                          "type": "stable_diffusion"})
        elif kind == "SFGRPOTrainLoRA":
            inputs.update(SMALL_TRAINING, run_name=run_name)
        elif kind == "SFGRPOPrompts":
            inputs["text"] = "\n".join(inputs["text"].splitlines()[:2])
        elif kind == "KSampler":
            inputs["steps"] = 3
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
    return graph


@pytest.fixture(scope="module")
def models(comfy_engine, tmp_path_factory):
    """The models folder: every file the two templates name (T5-XXL aside), PickScore's hub folders in rewards/."""
    import os

    import folder_paths
    from reward_stand_ins import build_stand_in

    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub: the reward's weights come from models/rewards or not at all
    root = tmp_path_factory.mktemp("template_models")
    write_sd35_files(root, t5=False)
    write_flux_files(root, t5=False)
    stand_in = build_stand_in("pickscore", root / "stand_in")
    shutil.copytree(stand_in["model"], root / "rewards" / "PickScore_v1")
    shutil.copytree(stand_in["processor"], root / "rewards" / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    for kind in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(kind, str(root / kind))
    yield root
    # 2.9 GB (CLIP-G and FLUX at the widths ComfyUI fixes): gone with the module, not at the end of the session.
    for kind in MODEL_FOLDERS:
        folder_paths.folder_names_and_paths[kind][0].remove(str(root / kind))
    shutil.rmtree(root)


def test_the_templates_name_the_files_comfyuis_examples_use_and_the_recipe():
    sd35, flux = (template(name) for name in TEMPLATES)
    loaders = {node["class_type"]: node["inputs"] for node in sd35.values()}
    assert loaders["CheckpointLoaderSimple"]["ckpt_name"] == "sd3.5_medium.safetensors"
    assert sorted(loaders["TripleCLIPLoader"].values()) == ["clip_g.safetensors", "clip_l.safetensors",
                                                              "t5xxl_fp16.safetensors"]
    assert loaders["SFGRPOLoadReward"]["reward"] == "pickscore" and loaders["SFGRPOLoadReward"]["weights"] == "auto"
    loaders = {node["class_type"]: node["inputs"] for node in flux.values()}
    assert loaders["UNETLoader"]["unet_name"] == "flux1-dev.safetensors"
    assert loaders["DualCLIPLoader"]["type"] == "flux" and loaders["VAELoader"]["vae_name"] == "ae.safetensors"
    assert loaders["SFGRPOLoadReward"]["reward"] == "ocr_pickscore"
    for graph in (sd35, flux):
        [train] = [node["inputs"] for node in graph.values() if node["class_type"] == "SFGRPOTrainLoRA"]
        assert train["method"] == "stepwise" and train["substeps"] == 5 and train["micro_batch_size"] >= 1
        prompts = [node["inputs"]["text"] for node in graph.values() if node["class_type"] == "SFGRPOPrompts"]
        assert len(prompts) == 2 and all(len(text.splitlines()) >= 4 for text in prompts)
    # The OCR recipe scores the text in quotes: every FLUX prompt has some.
    assert all('"' in line for node in flux.values() if node["class_type"] == "SFGRPOPrompts"
               for line in node["inputs"]["text"].splitlines())


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_template_trains_samples_scores_and_its_lora_loads_whole(comfy_engine, models, name):
    import nodes as comfy_nodes

    run_name = f"template_{name}"
    server = comfy_engine.run(for_this_machine(template(name), run_name))
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert not errors, errors[0]["exception_message"] + "".join(errors[0]["traceback"])
    executed = {data["node"]: data["output"] for event, data in server.messages if event == "executed"}
    graph = template(name)
    scores = [executed[node_id]["text"] for node_id, node in graph.items() if node["class_type"] == "SFGRPOScore"]
    assert len(scores) == 2 and all("mean" in "".join(text) for text in scores), scores
    [train_id] = [node_id for node_id, node in graph.items() if node["class_type"] == "SFGRPOTrainLoRA"]
    summary = "\n".join(executed[train_id]["text"])
    assert "held-out reward" in summary, summary

    [lora_file] = (comfy_engine.root / "loras" / "sfgrpo").glob(f"{run_name}_*.safetensors")
    lora = load_file(str(lora_file))
    assert lora and all(torch.isfinite(tensor).all() for tensor in lora.values())
    loader = next(node["inputs"] for node in graph.values()
                  if node["class_type"] in ("CheckpointLoaderSimple", "UNETLoader"))
    with torch.inference_mode():
        if "ckpt_name" in loader:
            model = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(loader["ckpt_name"])[0]
        else:
            model = comfy_nodes.UNETLoader().load_unet(loader["unet_name"], loader["weight_dtype"])[0]
        with comfy_engine.logged() as messages:
            (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
                model, f"sfgrpo/{lora_file.name}", 1.0)
    assert not [message for message in messages if "lora key not loaded" in message], messages
    assert len(patched.patches) > 0
