"""The model-backed rewards (rewards/vision.py) on random-initialised stand-ins of the real models, loaded through
the same code path as the real weights, with each score checked against an independent computation from the raw
model outputs (and the reference code's preprocessing, rebuilt here from torchvision)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reward_stand_ins import build_stand_in, imagereward_hf_home

from sfgrpo_core import rewards
from sfgrpo_core.rewards import MissingExtraError
from sfgrpo_core.rewards.vision import OPENAI_MEAN, OPENAI_STD, AestheticHead

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a cat", "a red sign that says \"hello\"", "two dogs " * 40]  # the last one is truncated
# Where `pip install --no-deps --target` put image-reward and its pins (see test_imagereward_with_the_real_package).
IMAGEREWARD_SITE = Path(os.environ.get("SFGRPO_IMAGEREWARD_SITE", ROOT / ".cache" / "imagereward-site"))


def _pil_images():
    """Three RGB images of different sizes and aspect ratios (so resizing, cropping and padding all matter)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in
            ((48, 40, 3), (33, 70, 3), (64, 64, 3))]


def _uint8_batch():
    rng = np.random.default_rng(1)
    return torch.from_numpy(rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8))


def _check_scores(scores, count=3):
    assert scores.dtype == torch.float32 and scores.shape == (count,) and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()


def _check_modules(reward):
    modules = reward.torch_modules()
    assert modules and all(isinstance(module, torch.nn.Module) for module in modules)
    assert reward.to("cpu") is reward and reward.device == torch.device("cpu")
    for module in modules:
        assert not module.training
        assert all(parameter.device.type == "cpu" and not parameter.requires_grad for parameter in module.parameters())


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stand_ins")
    return {name: build_stand_in(name, folder / name) for name in ("pickscore", "clip", "aesthetic", "hps")}


def test_importing_the_rewards_imports_no_model_library():
    code = ("import sys, sfgrpo_core.rewards as r; heavy = {'transformers', 'open_clip', 'ImageReward'} & "
            "set(sys.modules); assert not heavy, heavy; assert {'pickscore', 'clip', 'aesthetic', 'hps', "
            "'imagereward'} <= set(r.available())")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_describe_shows_the_flow_grpo_defaults():
    assert "yuvalkirstain/PickScore_v1" in rewards.describe("pickscore")
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in rewards.describe("pickscore")
    assert "openai/clip-vit-large-patch14" in rewards.describe("clip")
    assert "HPS_v2.1_compressed.pt" in rewards.describe("hps") and "ViT-H-14" in rewards.describe("hps")
    assert "THUDM/ImageReward" in rewards.describe("imagereward")
    for name in ("pickscore", "clip", "aesthetic", "hps", "imagereward"):
        assert "device='cpu'" in rewards.describe(name) and "): " in rewards.describe(name)


def test_pickscore_is_logit_scale_times_cosine_over_26(stand_ins):
    from transformers import AutoProcessor, CLIPModel

    options = stand_ins["pickscore"]
    reward = rewards.load("pickscore", **options, batch_size=2)
    images = _pil_images()
    scores = reward(images, PROMPTS)
    _check_scores(scores)
    # Independently: the CLIP forward's logits_per_image (= logit_scale.exp() * cosine), diagonal, / 26.
    processor = AutoProcessor.from_pretrained(options["processor"], backend="pil")
    model = CLIPModel.from_pretrained(options["model"]).eval()
    text = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert text["input_ids"].shape[1] == 77
    with torch.no_grad():
        output = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"], **text)
    torch.testing.assert_close(scores, output.logits_per_image.diagonal() / 26, rtol=1e-4, atol=1e-5)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    # A uint8 batch scores like the same images as PIL; the batch size does not change the scores.
    batch = _uint8_batch()
    torch.testing.assert_close(reward(batch, PROMPTS), reward([Image.fromarray(x) for x in batch.numpy()], PROMPTS))
    whole = rewards.load("pickscore", **options, batch_size=16)
    torch.testing.assert_close(whole(images, PROMPTS), scores, rtol=1e-5, atol=1e-6)
    _check_modules(reward)
    bf16 = rewards.load("pickscore", **options, dtype="bfloat16")(images, PROMPTS)
    _check_scores(bf16)
    assert reward([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        reward(images, PROMPTS[:2])


def test_clipscore_matches_flow_grpos_tensor_transforms_and_logits_over_30(stand_ins):
    import torchvision.transforms as T
    from transformers import CLIPModel, CLIPProcessor

    reward = rewards.load("clip", **stand_ins["clip"])
    images = _pil_images()
    scores = reward(images, PROMPTS)
    _check_scores(scores)
    # flow_grpo's ClipScorer: torchvision Resize (bilinear) / CenterCrop / Normalize from the processor's config on
    # [0, 1] pixels, text padded to max_length, logits_per_image.diagonal() / 30.
    processor = CLIPProcessor.from_pretrained(stand_ins["clip"]["model"])
    model = CLIPModel.from_pretrained(stand_ins["clip"]["model"]).eval()
    config = processor.image_processor.to_dict()
    transform = T.Compose([T.Resize(config["size"]["shortest_edge"]),
                           T.CenterCrop((config["crop_size"]["height"], config["crop_size"]["width"])),
                           T.Normalize(mean=config["image_mean"], std=config["image_std"])])
    pixels = torch.stack([transform(T.functional.to_tensor(image)) for image in images])
    torch.testing.assert_close(reward.pixels(images), pixels, rtol=0, atol=1e-5)
    text = processor(text=PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=pixels, **text)
    torch.testing.assert_close(scores, output.logits_per_image.diagonal() / 30, rtol=1e-4, atol=1e-5)
    _check_modules(reward)


def test_aesthetic_is_the_mlp_of_the_normalised_image_embedding(stand_ins):
    from transformers import CLIPModel, CLIPProcessor

    options = stand_ins["aesthetic"]
    reward = rewards.load("aesthetic", **options)
    images = _pil_images()
    scores = reward(images, PROMPTS)
    _check_scores(scores)
    processor = CLIPProcessor.from_pretrained(options["model"], backend="pil")
    model = CLIPModel.from_pretrained(options["model"]).eval()
    with torch.no_grad():
        output = model.vision_model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        embeds = model.visual_projection(output.pooler_output)
    x = embeds / embeds.norm(dim=-1, keepdim=True)
    state = torch.load(options["head"], weights_only=True)
    for index in (0, 2, 4, 6, 7):  # the Linear layers; no activations between them, dropout is off in eval
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x[:, 0], rtol=1e-4, atol=1e-5)
    _check_modules(reward)
    assert reward(images, ["", "", ""]).tolist() == scores.tolist()  # the prompt is not used


def test_aesthetic_head_loads_the_real_checkpoints_key_names(stand_ins, tmp_path):
    from safetensors.torch import save_file

    # Keys and shapes of sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor, shipped by flow_grpo).
    real = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
            "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
            "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    assert {key: tuple(value.shape) for key, value in AestheticHead().state_dict().items()} == real
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in real.items()}
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    model = stand_ins["aesthetic"]["model"]
    from_pth = rewards.load("aesthetic", model=model, head=str(tmp_path / "head.pth"))
    from_safetensors = rewards.load("aesthetic", model=model, head=str(tmp_path / "head.safetensors"))
    for reward in (from_pth, from_safetensors):
        torch.testing.assert_close(reward.head.layers[7].weight, state["layers.7.weight"])
    torch.testing.assert_close(from_pth(_pil_images(), PROMPTS), from_safetensors(_pil_images(), PROMPTS))
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the improved-aesthetic-predictor"):
        rewards.load("aesthetic", model=model, head=str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="needs head="):
        rewards.load("aesthetic", model=model)


def _hpsv2_preprocess(image, side):
    """hpsv2's preprocess_val (light_augmentation=True: ResizeMaxSize), rebuilt from torchvision."""
    import torchvision.transforms.functional as TF

    pixels = TF.to_tensor(image.convert("RGB"))
    height, width = pixels.shape[1:]
    scale = side / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        pixels = TF.resize(pixels, new_size, TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = side - new_size[0], side - new_size[1]
        pixels = TF.pad(pixels, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(pixels, OPENAI_MEAN, OPENAI_STD)


def test_hps_is_hpsv2s_cosine_of_open_clip_features(stand_ins):
    import open_clip

    options = stand_ins["hps"]
    reward = rewards.load("hps", **options)
    images = _pil_images()
    scores = reward(images, PROMPTS)
    _check_scores(scores)
    # As hpsv2's img_score: model(image, text) with output_dict, image_features @ text_features.T, diagonal.
    name = Path(options["arch"]).stem
    model = open_clip.create_model(name, pretrained=None, output_dict=True).eval()
    checkpoint = torch.load(Path(options["model"]) / "HPS_v2.1_compressed.pt", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    pixels = torch.stack([_hpsv2_preprocess(image, 32) for image in images])
    torch.testing.assert_close(reward.pixels(images), pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        output = model(pixels, open_clip.get_tokenizer(name)(PROMPTS))
    expected = torch.diagonal(output["image_features"] @ output["text_features"].T)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # The checkpoint file itself works as ``model`` too.
    direct = rewards.load("hps", model=str(Path(options["model"]) / "HPS_v2.1_compressed.pt"), arch=options["arch"])
    torch.testing.assert_close(direct(images, PROMPTS), scores)
    _check_modules(reward)


def test_hub_ids_that_are_not_cached_fail_offline_with_a_clear_error(stand_ins, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"reward 'pickscore'.*processor='laion/CLIP-ViT-H-14-laion2B-s32B-b79K'"
                                         r".*local folder") as error:
        rewards.load("pickscore")
    assert "hf download" in str(error.value)
    with pytest.raises(ValueError, match=r"reward 'pickscore'.*model='yuvalkirstain/PickScore_v1'.*local folder"):
        rewards.load("pickscore", processor=stand_ins["pickscore"]["processor"])
    with pytest.raises(ValueError, match=r"reward 'clip'.*model='openai/clip-vit-large-patch14'"):
        rewards.load("clip")
    with pytest.raises(ValueError, match=r"reward 'aesthetic'.*model='openai/clip-vit-large-patch14'"):
        rewards.load("aesthetic", head=stand_ins["aesthetic"]["head"])
    with pytest.raises(ValueError, match=r"reward 'hps'.*model='xswu/HPSv2'.*HPS_v2.1_compressed.pt"):
        rewards.load("hps")
    with pytest.raises(ValueError, match="does not exist"):
        rewards.load("clip", model=str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(ValueError, match="a folder without 'HPS_v2.1_compressed.pt'"):
        rewards.load("hps", model=str(tmp_path))


def test_an_unreachable_hub_fails_at_once_without_hf_hub_offline(monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    from sfgrpo_core.rewards.vision import hub_reachable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert hub_reachable()
    # The port is closed now: a refused connection, as on a machine without network (DNS failure, firewall).
    assert not hub_reachable()
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"reward 'hps'.*model='xswu/HPSv2'.*neither in the local hub cache nor "
                                         r"reachable"):
        rewards.load("hps")
    assert time.monotonic() - start < 30  # not huggingface_hub's minutes of retries


def test_imagereward_without_its_package_names_the_extra_and_the_reward_server(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as in an environment without it: import raises
    with pytest.raises(MissingExtraError, match=r"stepwise-flow-grpo\[imagereward\].*reward-server --reward "
                                                r"imagereward.*timm==0.6.13"):
        rewards.load("imagereward")


IMAGEREWARD_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    import ImageReward, timm
    from sfgrpo_core import rewards
    from reward_stand_ins import build_stand_in
    from sfgrpo_core.rewards.builtin import to_pil_images

    folder = Path(sys.argv[1])
    options = build_stand_in("imagereward", folder)
    reward = rewards.load("imagereward", **options, batch_size=2)
    saved = torch.load(Path(options["model"]) / "ImageReward.pt", weights_only=True)
    loaded = reward.model.state_dict()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 64, 48, 3), dtype=np.uint8))
    prompts = ["a photo of a cat", "a red sign", "two dogs " * 20]
    scores = reward(images, prompts)
    with torch.no_grad():  # the package's own per-image score, which flow_grpo's inference_rank(prompt, [image]) is
        package = [reward.model.score(prompt, image) for prompt, image in zip(prompts, to_pil_images(images))]
    print(json.dumps({
        "scores": scores.tolist(), "dtype": str(scores.dtype), "package": package, "timm": timm.__version__,
        "package_file": ImageReward.__file__, "modules": [type(m).__name__ for m in reward.torch_modules()],
        "weights_loaded": all(torch.equal(saved[key], loaded[key]) for key in saved),
    }))
""")


@pytest.mark.slow  # a subprocess or an install: left out by make test-fast
def test_imagereward_with_the_real_package(tmp_path):
    """The real image-reward package (and its timm 0.6.13 / transformers 4 pins) in a subprocess whose PYTHONPATH puts
    them before this environment's; a tiny-text-encoder ImageReward model with random weights and a stand-in
    'bert-base-uncased' tokenizer in a throw-away offline hub cache (the package loads that tokenizer by name)."""
    assert (IMAGEREWARD_SITE / "ImageReward").is_dir(), (
        f"no image-reward install at {IMAGEREWARD_SITE}: make install puts it there (pip install --no-deps --target "
        f"{IMAGEREWARD_SITE} -r tests/imagereward_site.txt)")
    script = tmp_path / "imagereward_check.py"
    script.write_text(IMAGEREWARD_SCRIPT)
    folder = tmp_path / "imagereward"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(IMAGEREWARD_SITE), str(ROOT), str(ROOT / "tests")]),
           "HF_HOME": str(imagereward_hf_home(folder)), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(folder)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["timm"] == "0.6.13" and result["package_file"].startswith(str(IMAGEREWARD_SITE))
    assert result["weights_loaded"] and result["modules"] == ["ImageReward"] and result["dtype"] == "torch.float32"
    scores, package = np.array(result["scores"]), np.array(result["package"])
    assert scores.shape == (3,) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, package, rtol=1e-4, atol=1e-5)
    assert np.ptp(scores) > 1e-3  # the stand-in's scores differ between images
