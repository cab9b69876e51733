"""FLUX and SD3 in bfloat16 (what their users run): two Stepwise iterations of the tiny random pipelines through
the diffusers backend keep every metric finite. On the CPU always; on CUDA where there is a GPU (the device tool):
a GPU check once found the tiny FLUX's loss NaN from the first update in bfloat16 on CUDA, never on the CPU."""

import json
import math

import pytest
import tiny_models
import torch

from sfgrpo_core import models
from sfgrpo_core.config import load_config
from sfgrpo_core.training.diagnose import diagnose
from sfgrpo_core.training.trainer import train

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU (run on the device tool)"))]


OPTIONS = {"dtype": "bfloat16", "latent_size": 16, "max_sequence_length": 8}


def _tiny_bfloat16_config(tmp_path, architecture: str, device: str):
    builder = {"sd3": tiny_models.tiny_sd3_pipeline, "flux": tiny_models.tiny_flux_pipeline}[architecture]
    folder = tmp_path / architecture
    builder().save_pretrained(str(folder))
    options = OPTIONS
    prompts = ["a red cube", "two blue spheres", "a green cat"]
    return load_config("configs/miniworld.yaml").replace(**{
        "model.name": "diffusers", "model.path": str(folder), "model.device": device,
        "model.options": json.dumps(options), "train.reward": "jpeg_compressibility", "train.reward_options": "{}",
        "train.prompts": prompts, "train.eval_prompts": prompts[:1], "train.group_size": 4,
        "train.groups_per_iteration": 2, "train.iterations": 2, "train.eval_every": 0,
        "train.output_dir": str(tmp_path / "run"), "sampler.steps": 4, "credit.substeps": 2, "lora.rank": 4,
        "lora.alpha": 8.0})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["flux", "sd3"])
def test_two_bfloat16_iterations_keep_every_metric_finite(tmp_path, architecture, device):
    config = _tiny_bfloat16_config(tmp_path, architecture, device)
    model = models.build("diffusers", path=config.model.path, device=device, **OPTIONS)
    assert {parameter.dtype for parameter in model.module.parameters()} == {torch.bfloat16}
    records = [record for record in train(config, model=model).records if "loss" in record]
    assert len(records) == 2
    for record in records:
        for field in ("loss", "approx_kl", "ratio_mean", "grad_norm", "reward_mean"):
            assert math.isfinite(record[field]), (field, record)
        assert record["active_transitions"] > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["flux", "sd3"])
def test_the_bfloat16_update_keeps_every_module_finite(tmp_path, architecture, device):
    """sfgrpo diagnose's finite_update on the same models: where a NaN is made, its message names the module."""
    config = _tiny_bfloat16_config(tmp_path, architecture, device)
    model = models.build("diffusers", path=config.model.path, device=device, **OPTIONS)
    check = next(result for result in diagnose(config, model=model) if result.name == "finite_update")
    assert check.passed, check.line()
