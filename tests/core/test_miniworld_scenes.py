"""Mini-world scenes: determinism, layout guarantees, caption templates and the train / held-out split."""

import numpy as np
import pytest

from sfgrpo_core.miniworld import scenes
from sfgrpo_core.miniworld.scenes import ObjectSpec, PromptSpec


def _boxes_apart(a, b):
    reach = a.size + b.size + scenes.GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def test_same_seed_gives_identical_scene_and_other_seeds_differ():
    first, again = scenes.sample_scene(7), scenes.sample_scene(7)
    assert first == again
    np.testing.assert_array_equal(first.image, again.image)
    assert first.caption == again.caption
    assert not np.array_equal(first.image, scenes.sample_scene(8).image)


def test_image_is_64x64_rgb_uint8_of_background_and_palette_colours():
    allowed = {scenes.BACKGROUND, *scenes.PALETTE.values()}
    for seed in range(50):
        image = scenes.sample_scene(seed).image
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert {tuple(int(v) for v in rgb) for rgb in image.reshape(-1, 3)} <= allowed


def test_objects_follow_the_spec_stay_inside_and_apart():
    for seed in range(300):
        scene = scenes.sample_scene(seed)
        spec, objects = scene.spec, scene.objects
        expected_count = spec.count if spec.category == "counting" else len(spec.objects)
        assert len(objects) == expected_count
        kinds = spec.objects * expected_count if spec.category == "counting" else spec.objects
        for obj, kind in zip(objects, kinds, strict=True):
            assert obj.shape == kind.shape and kind.color in (None, obj.color)
            assert scenes.MIN_SIZE <= obj.size <= scenes.MAX_SIZE
            assert scenes.GAP + obj.size <= min(obj.x, obj.y) and max(obj.x, obj.y) <= 64 - scenes.GAP - obj.size
            assert tuple(scene.image[int(obj.y), int(obj.x)]) == scenes.PALETTE[obj.color]  # centre is visible
        assert all(_boxes_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :])
        if spec.category == "position":
            assert scenes.is_arranged(objects[0], spec.relation, objects[1])


def test_every_category_is_sampled_and_can_be_asked_for():
    assert {scenes.sample_scene(seed).category for seed in range(200)} == set(scenes.CATEGORIES)
    for category in scenes.CATEGORIES:
        assert scenes.sample_scene(3, category).category == category


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("a circle", PromptSpec("single_object", (ObjectSpec("circle"),))),
        ("a circle and a square", PromptSpec("two_objects", (ObjectSpec("circle"), ObjectSpec("square")))),
        ("three red circles", PromptSpec("counting", (ObjectSpec("circle", "red"),), count=3)),
        ("one red circle", PromptSpec("counting", (ObjectSpec("circle", "red"),), count=1)),
        ("a green triangle", PromptSpec("colors", (ObjectSpec("triangle", "green"),))),
        (
            "a blue square left of a yellow triangle",
            PromptSpec(
                "position", (ObjectSpec("square", "blue"), ObjectSpec("triangle", "yellow")), relation="left of"
            ),
        ),
        (
            "a red square and a green circle",
            PromptSpec("color_attr", (ObjectSpec("square", "red"), ObjectSpec("circle", "green"))),
        ),
    ],
)
def test_templates_read_as_expected(text, spec):
    assert scenes.parse_caption(text) == spec
    assert scenes.caption(spec) == text


def test_parse_caption_inverts_every_template():
    for category in scenes.CATEGORIES:
        for spec in scenes.all_specs(category):
            assert scenes.parse_caption(scenes.caption(spec)) == spec


def test_parse_caption_ignores_case_surrounding_space_and_final_period():
    assert scenes.parse_caption("  Two Purple Squares. ") == scenes.parse_caption("two purple squares")


@pytest.mark.parametrize(
    ("text", "word"), [("a red dog", "dog"), ("five red circles", "five"), ("a circle near a square", "near")]
)
def test_unknown_word_raises_naming_it(text, word):
    with pytest.raises(ValueError, match=f"unknown word '{word}'"):
        scenes.parse_caption(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red",
        "red circle",
        "a circle and a red square",
        "a circle left of a square",
        "a red circle left a square",
    ],
)
def test_caption_outside_the_templates_raises(text):
    with pytest.raises(ValueError):
        scenes.parse_caption(text)


def test_splits_are_disjoint_nonempty_and_cover_every_category():
    for category in scenes.CATEGORIES:
        train, heldout = scenes.train_prompts(category), scenes.heldout_prompts(category)
        assert train and heldout
        assert not set(train) & set(heldout)
        assert sorted(train + heldout) == sorted(scenes.caption(spec) for spec in scenes.all_specs(category))
    assert len(scenes.train_prompts()) == sum(len(scenes.train_prompts(c)) for c in scenes.CATEGORIES)


def test_train_split_never_names_a_heldout_colour_shape_pair():
    train_text = " ".join(scenes.train_prompts())
    for color, shape in scenes.HELDOUT_PAIRS:
        assert f"{color} {shape}" not in train_text


def test_sampling_from_a_split_stays_in_it():
    heldout, train = set(scenes.heldout_prompts()), set(scenes.train_prompts())
    assert all(scenes.sample_scene(seed, split="heldout").caption in heldout for seed in range(100))
    assert all(scenes.sample_scene(seed, split="train").caption in train for seed in range(100))


def test_unknown_category_or_split_raises():
    with pytest.raises(ValueError, match="unknown category 'colours'"):
        scenes.sample_scene(0, "colours")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        scenes.sample_scene(0, "colors", split="test")
