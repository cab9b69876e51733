"""MiniGenEval's soft option: detection confidences instead of pass/fail checks, smooth in the pixels.

Checked here: high and close to the hard score on scenes that satisfy their caption, lower on wrong captions;
small steps along blends and under small perturbations where the hard score jumps; falling with noise; the
registry's options path; and soft=False byte-for-byte the hard reward.
"""

import hashlib
import itertools
import json
import math

import numpy as np
import pytest
import torch

from sfgrpo_core import rewards
from sfgrpo_core.miniworld import geneval, scenes
from sfgrpo_core.miniworld.scenes import ObjectSpec, PromptSpec

hard = geneval.MiniGenEval()
soft = geneval.MiniGenEval(soft=True)


@pytest.fixture(scope="module")
def true_scenes():
    """120 scenes, 20 of each category."""
    return [scenes.sample_scene(1000 + i, scenes.CATEGORIES[i % len(scenes.CATEGORIES)]) for i in range(120)]


def _images(scene_list):
    return np.stack([scene.image for scene in scene_list])


def _captions(scene_list):
    return [scene.caption for scene in scene_list]


def _blend(first, second, weight):
    """(1 - weight) first + weight second, rounded to uint8."""
    return np.round((1 - weight) * first.astype(np.float64) + weight * second).astype(np.uint8)


def _add_noise(image, sigma, rng):
    """The uint8 image plus rounded Gaussian noise of std `sigma` (0-255 units), clipped."""
    return np.clip(image + rng.normal(0, sigma, image.shape).round(), 0, 255).astype(np.uint8)


def _largest_steps(reward, first, second, caption, count):
    """Largest |score change| between neighbouring weights of `count` evenly spaced blends first -> second."""
    images = [_blend(first, second, weight) for weight in np.linspace(0, 1, count)]
    return float(reward(images, [caption] * count).diff().abs().max())


def _blend_pairs(count, seed=2000):
    """`count` (scene, other scene) pairs of different captions, all categories."""
    pool = [scenes.sample_scene(seed + i, scenes.CATEGORIES[i % len(scenes.CATEGORIES)]) for i in range(count + 7)]
    return [(pool[i], pool[i + 7]) for i in range(count)]


def test_rendered_scenes_score_high_and_close_to_the_hard_score(true_scenes):
    images, captions = _images(true_scenes), _captions(true_scenes)
    soft_scores, hard_scores = soft(images, captions), hard(images, captions)
    assert soft_scores.dtype == torch.float32 and soft_scores.shape == (120,)
    assert ((soft_scores >= 0) & (soft_scores <= 1)).all()
    assert soft_scores.min() > 0.85 and soft_scores.mean() > 0.95
    assert (hard_scores - soft_scores).abs().mean() < 0.05
    assert min(geneval.category_means(soft_scores, captions).values()) > 0.93


def _wrong_spec(spec, kind):
    """The spec with its colour, count, shape or relation changed (one of them)."""
    first, *rest = spec.objects
    if kind == "colour":
        other_color = next(color for color in scenes.COLORS if color != first.color)
        return PromptSpec(spec.category, (ObjectSpec(first.shape, other_color), *rest), spec.count, spec.relation)
    if kind == "count":
        return PromptSpec(spec.category, spec.objects, count=spec.count % len(scenes.NUMBER_WORDS) + 1)
    if kind == "shape":
        other_shape = next(shape for shape in scenes.SHAPES if shape != first.shape)
        return PromptSpec(spec.category, (ObjectSpec(other_shape, first.color), *rest), spec.count, spec.relation)
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    return PromptSpec(spec.category, spec.objects, relation=opposite[spec.relation])


WRONG_KINDS = [("colour", "colors"), ("count", "counting"), ("shape", "single_object"), ("relation", "position")]


@pytest.mark.parametrize("kind, category", WRONG_KINDS)
def test_wrong_colour_count_shape_or_relation_scores_lower(kind, category):
    scene_list = [scenes.sample_scene(4000 + i, category) for i in range(16)]
    images = _images(scene_list)
    wrong = [scenes.caption(_wrong_spec(scene.spec, kind)) for scene in scene_list]
    right_scores, wrong_scores = soft(images, _captions(scene_list)), soft(images, wrong)
    assert (wrong_scores < right_scores - 0.25).all(), (right_scores, wrong_scores)
    # the constraints that still hold keep their truth: the soft score follows the hard fraction
    assert abs(wrong_scores.mean() - hard(images, wrong).mean()) < 0.1


def test_captions_of_other_scenes_score_low(true_scenes):
    images, others = _images(true_scenes), _captions(true_scenes[1:] + true_scenes[:1])
    soft_scores = soft(images, others)
    assert soft_scores.mean() < 0.35
    assert abs(soft_scores.mean() - hard(images, others).mean()) < 0.05


def test_blending_towards_another_scene_moves_the_soft_score_in_small_steps():
    pairs = _blend_pairs(12)
    soft_steps = [_largest_steps(soft, a.image, b.image, a.caption, 41) for a, b in pairs]
    hard_steps = [_largest_steps(hard, a.image, b.image, a.caption, 41) for a, b in pairs]
    assert max(soft_steps) < 0.5 and np.median(soft_steps) < 0.15, soft_steps
    assert np.median(hard_steps) >= 0.5, hard_steps  # pass/fail: the score jumps by whole constraints


def test_finer_blends_shrink_the_soft_steps_but_not_the_hard_ones():
    """Continuity: a score continuous in the pixels takes smaller steps on finer blends; a step function does not."""
    pairs = _blend_pairs(6, seed=2100)
    coarse = [_largest_steps(soft, a.image, b.image, a.caption, 17) for a, b in pairs]
    fine = [_largest_steps(soft, a.image, b.image, a.caption, 65) for a, b in pairs]
    assert np.median(fine) < 0.5 * np.median(coarse), (coarse, fine)
    hard_coarse = [_largest_steps(hard, a.image, b.image, a.caption, 17) for a, b in pairs]
    hard_fine = [_largest_steps(hard, a.image, b.image, a.caption, 65) for a, b in pairs]
    assert np.median(hard_fine) >= 0.9 * np.median(hard_coarse) > 0.3, (hard_coarse, hard_fine)


def test_fading_into_the_background_lowers_the_soft_score_gradually(true_scenes):
    count = 21
    for scene in true_scenes[:12]:
        background = np.full_like(scene.image, scenes.BACKGROUND)
        images = [_blend(scene.image, background, weight) for weight in np.linspace(0, 1, count)]
        soft_scores = soft(images, [scene.caption] * count)
        assert soft_scores[0] > 0.85 and soft_scores[-1] == 0.0
        assert soft_scores.diff().max() < 1e-3, soft_scores  # falls monotonically
        assert soft_scores.diff().abs().max() < 0.25, soft_scores
        assert hard([images[0], images[-1]], [scene.caption] * 2).tolist() == [1.0, 0.0]


def test_slightly_perturbed_images_score_almost_the_same():
    pairs = _blend_pairs(36, seed=3000)
    rng = np.random.default_rng(0)
    for weight in (0.0, 0.2, 0.3):  # clean scenes, and blends where the detections are borderline
        images = [_blend(a.image, b.image, weight) for a, b in pairs]
        perturbed = [_add_noise(image, 2.0, rng) for image in images]
        captions = [a.caption for a, _ in pairs]
        differences = (soft(images, captions) - soft(perturbed, captions)).abs()
        assert differences.max() < 0.05 and differences.mean() < 0.02, (weight, differences)


def test_soft_score_falls_as_pixel_noise_grows(true_scenes):
    images, captions = _images(true_scenes[:60]), _captions(true_scenes[:60])
    rng = np.random.default_rng(1)
    means = []
    for sigma in (0, 20, 40, 60, 80):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        means.append(float(soft(noisy, captions).mean()))
    assert all(later < earlier for earlier, later in itertools.pairwise(means)), means
    assert means[0] > 0.95 and means[-1] < 0.3, means


def test_the_registry_builds_it_from_options_json(true_scenes):
    reward = rewards.load("mini_geneval", **json.loads('{"soft": true}'))
    assert isinstance(reward, geneval.MiniGenEval) and reward.soft
    images, captions = _images(true_scenes[:6]), _captions(true_scenes[:6])
    scores = rewards.score(reward, images, captions).values
    torch.testing.assert_close(scores, soft(images, captions))
    assert not torch.equal(scores, hard(images, captions))
    assert "soft=False" in rewards.describe("mini_geneval")
    assert not rewards.load("mini_geneval", **json.loads('{"soft": false}')).soft


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_a_non_boolean_soft_option_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match=r"'soft' must be a boolean.*true or false") as error:
        rewards.load("mini_geneval", soft=value)
    assert repr(value) in str(error.value)
    with pytest.raises(ValueError, match="soft"):
        geneval.MiniGenEval(soft=value)


# sha256 of the hard reward's score_details (JSON) and scores (float32 bytes) on _hard_reference_batch, recorded
# before the soft option existed: soft=False must stay this reward, byte for byte.
HARD_DETAILS_SHA256 = "3270864c1a44901f7421c2c5721756d8c4fba4684bdb35d3b54e67384fd2af37"
HARD_SCORES_SHA256 = "b702317a60fe33222b8275a4b6171903e7707913a9138497b3f1c3fcc65126d3"


def _hard_reference_batch():
    """108 images and captions: 36 scenes with another scene's caption, noisy (sigma 60), half-blended with another."""
    scene_list = [scenes.sample_scene(5000 + i, scenes.CATEGORIES[i % 6]) for i in range(36)]
    rng = np.random.default_rng(3)
    images, captions = [], []
    for i, scene in enumerate(scene_list):
        other = scene_list[(i + 1) % len(scene_list)]
        images.append(scene.image)
        captions.append(other.caption)
        images.append(np.clip(scene.image + rng.normal(0, 60, scene.image.shape), 0, 255).astype(np.uint8))
        captions.append(scene.caption)
        images.append(np.round(0.5 * scene.image + 0.5 * other.image).astype(np.uint8))
        captions.append(scene.caption)
    return images, captions


def test_soft_off_is_the_hard_reward_byte_for_byte():
    images, captions = _hard_reference_batch()
    details = [geneval.score_details(image, caption) for image, caption in zip(images, captions, strict=True)]
    assert hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest() == HARD_DETAILS_SHA256
    off = geneval.MiniGenEval(soft=False)(images, captions)
    assert hashlib.sha256(off.numpy().tobytes()).hexdigest() == HARD_SCORES_SHA256
    assert len(set(off.tolist())) >= 4  # the batch exercises partial scores, not only 0 and 1
    for reward in (hard, rewards.load("mini_geneval"), rewards.load("mini_geneval", soft=False)):
        assert torch.equal(reward(images, captions), off)


def test_score_details_report_soft_truth_values():
    spec = PromptSpec("color_attr", (ObjectSpec("square", "red"), ObjectSpec("circle", "green")))
    swapped = PromptSpec("color_attr", (ObjectSpec("square", "green"), ObjectSpec("circle", "red")))
    image = scenes.render(swapped, np.random.default_rng(0))[0]
    details = geneval.score_details(image, scenes.caption(spec), soft=True)
    truths = [item["truth"] for item in details["constraints"]]
    assert [item["held"] for item in details["constraints"]] == [True, True, False, False]  # the hard checks
    assert min(truths[:2]) > 0.9 and max(truths[2:]) < 0.1, truths
    assert details["score"] == pytest.approx(sum(truths) / 4)
    assert len(details["candidates"]) == 2
    assert {max(c["colors"], key=c["colors"].get) for c in details["candidates"]} == {"green", "red"}
    assert "truth" not in geneval.score_details(image, scenes.caption(spec))["constraints"][0]


def test_unscorable_item_is_nan_and_the_others_keep_their_scores(true_scenes):
    good = true_scenes[0].image
    items = [good, good[:, :, 0], good.astype(np.float32), good]
    scores = soft(items, [true_scenes[0].caption] * len(items))
    assert torch.isnan(scores[1:3]).all() and not torch.isnan(scores[[0, 3]]).any()
    assert scores[0] == scores[3] > 0.85
    details = geneval.score_details(good[:, :, 0], true_scenes[0].caption, soft=True)
    assert math.isnan(details["score"]) and all(item["truth"] is None for item in details["constraints"])


def test_count_truth_is_the_probability_of_exactly_that_many():
    probabilities = [0.9, 0.6, 0.2]
    for count in range(5):
        brute = sum(
            math.prod(p if hit else 1 - p for p, hit in zip(probabilities, hits, strict=True))
            for hits in itertools.product([False, True], repeat=3)
            if sum(hits) == count
        )
        assert geneval.probability_of_exactly(probabilities, count) == pytest.approx(brute)
    image = scenes.render(PromptSpec("counting", (ObjectSpec("circle", "red"),), count=3), np.random.default_rng(0))[0]
    three, two, none = (
        geneval.score_details(image, text, soft=True)["score"]
        for text in ("three red circles", "two red circles", "two blue circles")
    )
    assert three > 0.85 and abs(two - 0.5) < 0.1 and none < 0.05, (three, two, none)
