"""The GPU checks that benchmarks/gpu_check.py (training on cuda: the mini world, tiny bfloat16 SD3 / FLUX) does not
cover. They need CUDA: on a machine without it they are skipped (the suite's only skips); on a GPU machine run
``bash benchmarks/gpu_check.sh``, which runs both. Each test prints what it measured as a line starting "GPU:".

- two processes over nccl (DDP and FSDP) give the one-process LoRA (needs two GPUs);
- the ComfyUI nodes (sampler, Tweedie preview, Train LoRA) run on the GPU through ComfyUI's model management.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device tool)")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _report(what: str, **values) -> None:
    print(f"GPU: {what} " + json.dumps(values), flush=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_gpus_over_nccl_train_the_lora_of_one(tmp_path, sharding):
    args = ["train", "configs/miniworld.yaml", "--model.device", "cuda", "--train.groups_per_iteration", "2",
            "--train.group_size", "4", "--train.eval_every", "0", "--train.iterations", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *args, "--train.output_dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *args, "--train.output_dir", str(tmp_path / "two"),
                          "--train.sharding", sharding, "--processes", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    expected, got = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    worst = max(float((expected[k] - got[k]).norm() / expected[k].norm().clamp_min(1e-12)) for k in expected)
    _report("nccl", sharding=sharding, relative_difference=worst)
    assert worst <= 1e-3


def test_the_comfyui_nodes_run_on_the_gpu(tmp_path):
    """sde_vs_euler, tweedie_preview and train_lora (2 iterations) through a ComfyUI that may use the GPU."""
    from sfgrpo_core.headless.runner import run_workflow
    from sfgrpo_core.headless.server import ComfyServer, ensure_comfyui

    api = ROOT / "workflows" / "api"
    with ComfyServer(tmp_path / "comfy", comfyui=ensure_comfyui(install_requirements=True), cpu=False) as server:
        import urllib.request

        with urllib.request.urlopen(server.url + "/system_stats", timeout=30) as response:
            devices = json.loads(response.read())["devices"]
        assert any(device["type"] == "cuda" for device in devices), devices
        for name, overrides in (("sde_vs_euler", ()), ("tweedie_preview", ()),
                                ("train_lora", ("Train LoRA.iterations=2", "Train LoRA.eval_every=1",
                                                "Train LoRA.eval_samples=1", "Train LoRA.checkpoint_every=1"))):
            result = run_workflow(api / f"{name}.json", server_url=server.url, overrides=overrides,
                                  out_dir=tmp_path / name)
            assert result.status == "success", (name, server.log_tail())
        _report("comfyui", devices=[device["name"] for device in devices])


def test_step_noise_is_drawn_on_the_gpu_per_member_and_reproducibly():
    from sfgrpo_core.seeding import member_generators, member_noise

    like = torch.zeros(4, 16, 32, 32, device="cuda")
    seeds = [11, 12, 13, 14]
    generators = member_generators(seeds, "cuda")
    assert all(generator.device.type == "cuda" for generator in generators)
    noise = member_noise(generators, like)
    again = member_noise(member_generators(seeds, "cuda"), like)
    alone = member_noise(member_generators(seeds[2:3], "cuda"), like[:1])  # a member's noise ignores the others
    assert noise.device.type == "cuda" and torch.equal(noise, again) and torch.equal(noise[2:3], alone)
    _report("step noise on cuda", std=float(noise.std()))


@pytest.mark.parametrize("name", ["train_lora_sd35_pickscore", "train_lora_flux_ocr"])
def test_the_real_model_templates_run_as_shipped_with_t5_xxl(tmp_path, name):
    """The SD3.5 and FLUX templates with their own text-encoder loaders (T5-XXL at its size, random weights: the CPU
    test swaps it for CLIP alone), at their 512 px, one iteration of a group of 2."""
    import shutil

    from reward_stand_ins import build_stand_in
    from template_models import write_flux_files, write_sd35_files

    from sfgrpo_core.headless.runner import run_workflow
    from sfgrpo_core.headless.server import ComfyServer, ensure_comfyui

    models = tmp_path / "models"
    extra = {kind: [models / kind] for kind in ("checkpoints", "text_encoders", "diffusion_models", "vae", "rewards")}
    (write_sd35_files if "sd35" in name else write_flux_files)(models, t5=True)
    stand_in = build_stand_in("pickscore", tmp_path / "stand_in")
    shutil.copytree(stand_in["model"], models / "rewards" / "PickScore_v1")
    shutil.copytree(stand_in["processor"], models / "rewards" / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    quick = [f"Train LoRA.{key}={value}" for key, value in dict(
        iterations=1, group_size=2, groups_per_iteration=1, eval_samples=1, eval_every=1, checkpoint_every=1).items()]
    with ComfyServer(tmp_path / "comfy", comfyui=ensure_comfyui(install_requirements=True), cpu=False,
                     extra_model_paths=extra) as server:
        result = run_workflow(ROOT / "workflows" / "api" / f"{name}.json", server_url=server.url, overrides=quick,
                              out_dir=tmp_path / "out")
        assert result.status == "success", (name, server.log_tail())
        assert list((server.models_dir / "loras" / "sfgrpo").glob("*.safetensors")), server.log_tail()
    _report("template", name=name, files=len(result.files))
