"""The GPU checks. They need CUDA: on a machine without it they are skipped (the suite's only skips); on a GPU
machine run ``bash benchmarks/gpu_check.sh`` (these tests with -s, then ``sfgrpo bench speed --device cuda``). Each
test prints what it measured (peak memory, seconds per phase) as a line starting with "GPU:".

- the mini world trains on cuda, finite, with its peak memory and phase times;
- tiny random-init diffusers SD3 and FLUX pipelines train in bfloat16 on cuda and their LoRA reloads in diffusers;
- two processes over nccl (DDP and FSDP) give the one-process LoRA (needs two GPUs);
- the ComfyUI nodes (sampler, Tweedie preview, Train LoRA) run on the GPU through ComfyUI's model management.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tiny_models as tiny
import torch
from safetensors.torch import load_file

from sfgrpo_core.config import Config, load_config
from sfgrpo_core.training import trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device tool)")
ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube", "two blue spheres"]


def _report(what: str, **values) -> None:
    print(f"GPU: {what} " + json.dumps(values), flush=True)


def _phases(records: list[dict]) -> dict[str, float]:
    return {key: round(sum(r.get(key, 0.0) for r in records) / len(records), 3)
            for key in ("seconds_rollout", "seconds_rewards", "seconds_update")}


def test_the_mini_world_trains_on_cuda(tmp_path):
    config = load_config(ROOT / "configs" / "miniworld.yaml").replace(**{
        "model.device": "cuda", "train.iterations": 3, "train.eval_every": 3, "train.eval_samples": 2,
        "train.output_dir": str(tmp_path / "run")})
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train(config)
    assert len([r for r in result.records if "reward_mean" in r]) == 3
    weights = load_file(str(result.lora_path))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    _report("mini world", peak_mib=torch.cuda.max_memory_allocated() // 2**20,
            **_phases([r for r in result.records if "reward_mean" in r]))


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_tiny_diffusers_pipelines_train_in_bfloat16_on_cuda(tmp_path, architecture):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    builder = {"sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}[architecture]
    builder().save_pretrained(tmp_path / architecture)
    config = Config().replace(**{
        "model.name": "diffusers", "model.path": str(tmp_path / architecture), "model.device": "cuda",
        "model.options": json.dumps({"dtype": "bfloat16", "max_sequence_length": 8}),
        "train.reward": "jpeg_compressibility", "train.prompts": PROMPTS, "train.eval_prompts": PROMPTS[:1],
        "train.group_size": 4, "train.groups_per_iteration": 2, "train.iterations": 2, "train.eval_every": 0,
        "train.output_dir": str(tmp_path / "run"), "sampler.steps": 4, "credit.substeps": 2,
        "lora.rank": 2, "lora.alpha": 4.0})
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train(config)
    assert all(torch.isfinite(tensor).all() for tensor in load_file(str(result.lora_path)).values())
    pipeline_class = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[architecture]
    pipeline = pipeline_class.from_pretrained(str(tmp_path / architecture), torch_dtype=torch.bfloat16).to("cuda")
    pipeline.load_lora_weights(str(result.run_dir / "lora_diffusers.safetensors"))
    _report(f"tiny {architecture} bf16", peak_mib=torch.cuda.max_memory_allocated() // 2**20,
            **_phases(result.records))


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
