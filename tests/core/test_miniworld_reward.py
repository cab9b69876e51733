"""MiniGenEval on rendered scenes, noise, blank images, wrong captions, degraded images and malformed inputs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sfgrpo_core.miniworld import geneval, scenes
from sfgrpo_core.miniworld.scenes import ObjectSpec, PromptSpec

reward = geneval.MiniGenEval()


@pytest.fixture(scope="module")
def true_scenes():
    """600 scenes, 100 of each category."""
    return [scenes.sample_scene(1000 + i, scenes.CATEGORIES[i % len(scenes.CATEGORIES)]) for i in range(600)]


def _images(scene_list):
    return np.stack([scene.image for scene in scene_list])


def _captions(scene_list):
    return [scene.caption for scene in scene_list]


def _render(spec, seed=0):
    return scenes.render(spec, np.random.default_rng(seed))[0]


def test_rendered_scenes_score_perfectly_in_every_category(true_scenes):
    scores = reward(_images(true_scenes), _captions(true_scenes))
    assert scores.dtype == torch.float32 and scores.shape == (600,)
    assert scores.mean() >= 0.98
    per_category = geneval.category_means(scores, _captions(true_scenes))
    assert set(per_category) == set(scenes.CATEGORIES)
    assert min(per_category.values()) >= 0.95


def test_noise_and_blank_images_score_low(true_scenes):
    captions = _captions(true_scenes[:100])
    noise = np.random.default_rng(0).integers(0, 256, (100, 64, 64, 3), dtype=np.uint8)
    assert reward(noise, captions).mean() < 0.1
    fills = [(0, 0, 0), (255, 255, 255), (128, 128, 128), scenes.BACKGROUND, scenes.PALETTE["red"]]
    blanks = np.stack([np.full((64, 64, 3), fills[i % len(fills)], dtype=np.uint8) for i in range(100)])
    assert reward(blanks, captions).mean() < 0.1


def test_captions_of_other_scenes_score_low(true_scenes):
    others = _captions(true_scenes[1:] + true_scenes[:1])
    assert reward(_images(true_scenes), others).mean() < 0.35


def test_blurred_noisy_scenes_still_score_high(true_scenes):
    rng = np.random.default_rng(1)
    degraded = []
    for scene in true_scenes[:120]:
        blurred = np.asarray(Image.fromarray(scene.image).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        degraded.append(np.clip(blurred + rng.normal(0, 20, blurred.shape), 0, 255).astype(np.uint8))
    assert reward(degraded, _captions(true_scenes[:120])).mean() >= 0.9


def test_every_input_form_gives_the_same_scores(true_scenes):
    batch, captions = _images(true_scenes[:12]), _captions(true_scenes[:12])
    expected = reward(batch, captions)
    torch.testing.assert_close(reward(torch.from_numpy(batch), captions), expected)
    torch.testing.assert_close(reward([Image.fromarray(image) for image in batch], captions), expected)
    torch.testing.assert_close(reward([torch.from_numpy(image) for image in batch], captions), expected)
    upscaled = [Image.fromarray(image).resize((256, 256), Image.Resampling.BICUBIC) for image in batch]
    torch.testing.assert_close(reward(upscaled, captions), expected)


def test_unscorable_item_is_nan_and_the_others_keep_their_scores(true_scenes):
    good = true_scenes[0].image
    items = [good, good[:, :, 0], good.astype(np.float32), np.zeros((64, 64, 4), np.uint8), good]
    scores = reward(items, [true_scenes[0].caption] * len(items))
    assert scores[0] == 1.0 and scores[4] == 1.0
    assert torch.isnan(scores[1:4]).all()
    details = geneval.score_details(good[:, :, 0], true_scenes[0].caption)
    assert math.isnan(details["score"]) and all(item["held"] is None for item in details["constraints"])


def test_unparseable_prompt_raises_naming_it(true_scenes):
    with pytest.raises(ValueError, match="'a red dog'"):
        reward(_images(true_scenes[:2]), [true_scenes[0].caption, "a red dog"])


def test_mismatched_lengths_raise(true_scenes):
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        reward(_images(true_scenes[:2]), [true_scenes[0].caption])


def test_spec_in_metadata_replaces_parsing(true_scenes):
    scene, other = true_scenes[0], true_scenes[3]
    metadata = [{"spec": scene.spec}, None]
    scores = reward(np.stack([scene.image, other.image]), [other.caption, other.caption], metadata)
    assert scores.tolist() == [1.0, 1.0]


def test_swapped_colours_fail_only_the_binding_constraints():
    spec = PromptSpec("color_attr", (ObjectSpec("square", "red"), ObjectSpec("circle", "green")))
    swapped = PromptSpec("color_attr", (ObjectSpec("square", "green"), ObjectSpec("circle", "red")))
    details = geneval.score_details(_render(swapped), scenes.caption(spec))
    assert details["category"] == "color_attr" and details["score"] == 0.5
    assert [item["held"] for item in details["constraints"]] == [True, True, False, False]
    assert {(det["shape"], det["color"]) for det in details["detections"]} == {("square", "green"), ("circle", "red")}


def test_reversed_relation_fails_only_the_relation():
    objects = (ObjectSpec("square", "blue"), ObjectSpec("triangle", "yellow"))
    image = _render(PromptSpec("position", objects, relation="left of"))
    details = geneval.score_details(image, "a blue square right of a yellow triangle")
    assert [item["held"] for item in details["constraints"]] == [True, True, False]
    assert geneval.score_details(image, "a yellow triangle right of a blue square")["score"] == 1.0


def test_wrong_count_fails_only_the_count():
    image = _render(PromptSpec("counting", (ObjectSpec("circle", "red"),), count=3))
    assert geneval.score_details(image, "three red circles")["score"] == 1.0
    assert geneval.score_details(image, "two red circles")["score"] == 0.5
    assert geneval.score_details(image, "two blue circles")["score"] == 0.0


def test_registered_in_the_reward_registry():
    from sfgrpo_core import rewards
    from sfgrpo_core.miniworld.scenes import sample_scene

    scene = sample_scene(7)
    scores = rewards.score(rewards.load("mini_geneval"), np.stack([scene.image]), [scene.caption]).values
    assert scores.tolist() == [1.0]
