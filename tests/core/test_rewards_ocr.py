"""The offline OCR reward (rapidocr-onnxruntime's PP-OCRv4) and the NudeNet safety penalty, on their bundled models."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from sfgrpo_core import rewards
from sfgrpo_core.rewards import MissingExtraError, RewardInputError
from sfgrpo_core.rewards.ocr import OcrReward, normalize_text, ocr_text_score, quoted_text
from sfgrpo_core.rewards.safety import NUDENET_CLASSES, UNSAFE_CLASSES, NsfwPenalty, nsfw_penalty


def render_text(text: str, size: int = 256, fill: float = 0.8, ink=(25, 25, 30), paper=(235, 230, 215)) -> Image.Image:
    """``text`` centred on a plain ``size`` px square, about ``fill`` of its width (Pillow's scalable default font)."""
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    font_size = size
    while True:
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= fill * size or font_size <= 6:
            break
        font_size -= 1
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, font=font, fill=ink)
    return image


# ---- the text score: Flow-GRPO's rule, on hand-made strings ------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (char_a != char_b))
    return row[-1]


def _flow_grpo_score(recognized: str, prompt: str) -> float:
    """flow_grpo/ocr.py's OcrScorer rule, restated independently (a plain dynamic-programming edit distance)."""
    target = prompt.split('"')[1].replace(" ", "").lower()
    recognized = recognized.replace(" ", "").lower()
    distance = 0 if target in recognized else _levenshtein(recognized, target)
    return 1 - min(distance, len(target)) / len(target)


def test_quoted_text_is_the_first_pair():
    assert quoted_text('New York skyline with "Hello World" written in fireworks') == "Hello World"
    assert quoted_text('a "first" and a "second" sign') == "first"
    assert quoted_text('"only"') == "only"


@pytest.mark.parametrize("prompt", ["a cat holding a sign", 'a sign with an unclosed "quote', 'an empty "" sign',
                                    'a blank "   " sign', "curly \u201cquotes\u201d are not straight ones"])
def test_prompt_without_quoted_text_raises_naming_it(prompt):
    with pytest.raises(RewardInputError) as caught:
        quoted_text(prompt)
    message = str(caught.value)
    assert repr(prompt) in message and "double quotes" in message


def test_text_score_rule():
    assert normalize_text("Hello World ") == "helloworld"
    assert ocr_text_score("Hello World", "hello world") == 1.0          # case and spaces do not matter
    assert ocr_text_score("HELLOWORLD", "Hello World") == 1.0
    assert ocr_text_score("Sign: hello world!!", "Hello World") == 1.0  # contained target: 1, extra text is free
    assert ocr_text_score("", "Hello") == 0.0                           # nothing read
    assert ocr_text_score("Hellp", "Hello") == pytest.approx(0.8)       # one substitution in 5 characters
    assert ocr_text_score("Helo", "Hello") == pytest.approx(0.8)        # one deletion
    assert ocr_text_score("xyzzy-quux-garply", "Hi") == 0.0             # distance capped at len(target)
    assert ocr_text_score("ab", "abc") == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError):
        ocr_text_score("anything", "  ")


def test_text_score_matches_flow_grpo_on_random_strings():
    generator = random.Random(0)
    alphabet = "abcAB C1"
    for _ in range(400):
        target = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 8)))
        if not target.replace(" ", ""):
            continue
        recognized = "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 12)))
        expected = _flow_grpo_score(recognized, f'a sign that says "{target}" in a street')
        assert ocr_text_score(recognized, target) == pytest.approx(expected), (recognized, target)


# ---- the OCR reward on rendered text ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ocr_reward():
    return rewards.load("ocr")


def test_ocr_reward_reads_rendered_text(ocr_reward):
    images = [render_text("Hello World"), render_text("OPEN"), render_text("Stepwise"), Image.new("RGB", (256, 256),
                                                                                                    (235, 230, 215))]
    prompts = ['New York skyline with "Hello World" written in fireworks', 'a shop sign that says "open"',
               'a poster that says "Banana Split"', 'a sign that says "Hello"']
    scores = ocr_reward(images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores[0] > 0.8 and scores[1] > 0.8  # the right text (case-insensitive)
    assert scores[2] < 0.5                       # the wrong text
    assert scores[3] == pytest.approx(0.0, abs=0.05)  # blank image: OCR finds nothing, scored by the formula
    # The same images as a uint8 tensor [B, H, W, 3] score the same.
    stacked = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    assert torch.allclose(ocr_reward(stacked, prompts), scores)


def test_ocr_reward_reads_a_64px_image(ocr_reward):
    # Mini-world size: upscaled to min_size=128 before detection.
    assert ocr_reward([render_text("OPEN", size=64)], ['a sign that says "OPEN"'])[0] > 0.8


def test_prompt_without_quotes_raises_through_score(ocr_reward):
    images = [render_text("OPEN"), render_text("OPEN")]
    prompt = "a shop sign that says OPEN"
    with pytest.raises(RewardInputError, match="a shop sign that says OPEN"):
        ocr_reward(images, ['a sign that says "OPEN"', prompt])
    with pytest.raises(RewardInputError, match="double quotes"):  # rewards.score propagates it, never NaN
        rewards.score(ocr_reward, images, ['a sign that says "OPEN"', prompt])


def test_ocr_options_and_description():
    assert "ocr(" in rewards.describe("ocr") and "min_size=128" in rewards.describe("ocr")
    for bad in ({"min_size": -1}, {"max_size": 16}, {"drop_score": 2.0}, {"num_threads": -1}):
        with pytest.raises(ValueError):
            rewards.load("ocr", **bad)
    reward = OcrReward(min_size=128, max_size=256)
    assert reward.prepare(Image.new("RGB", (64, 32))).size == (256, 128)   # shorter side up to min_size
    assert reward.prepare(Image.new("RGB", (512, 512))).size == (256, 256)  # longer side down to max_size
    assert OcrReward(use_det=False).prepare(Image.new("RGB", (64, 32))).size == (64, 32)


def test_missing_ocr_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"\[ocr\]"):
        OcrReward().engine()


def test_importing_the_rewards_loads_no_ocr_or_nsfw_package():
    code = ("import sys, sfgrpo_core.rewards as r; assert 'ocr' in r.available() and 'nsfw' in r.available(); "
            "print(sorted(m for m in ('rapidocr_onnxruntime', 'nudenet', 'rapidfuzz', 'onnxruntime') "
            "if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


# ---- the NSFW penalty -----------------------------------------------------------------------------------------


def test_nsfw_penalty_rule():
    found = [{"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 9, 9]},
             {"class": "FEMALE_BREAST_EXPOSED", "score": 0.6, "box": [0, 0, 9, 9]},
             {"class": "BUTTOCKS_EXPOSED", "score": 0.7, "box": [0, 0, 9, 9]}]
    assert nsfw_penalty([]) == 0.0
    assert nsfw_penalty(found) == pytest.approx(-0.7)                # highest unsafe confidence; faces not counted
    assert nsfw_penalty(found, threshold=0.8) == 0.0                  # below threshold: ignored
    assert nsfw_penalty(found, classes=["FACE_FEMALE"]) == pytest.approx(-0.95)
    assert set(UNSAFE_CLASSES) <= set(NUDENET_CLASSES) and len(NUDENET_CLASSES) == 18


def test_nsfw_penalty_on_safe_images_is_zero():
    reward = rewards.load("nsfw")
    generator = np.random.default_rng(0)
    images = [Image.new("RGB", (256, 256), (128, 128, 128)), Image.new("RGB", (512, 512), (230, 180, 150)),
              Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)), render_text("Hello World")]
    scores = reward(images, [""] * len(images))
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert torch.all(scores <= 0) and torch.all(scores >= -1)
    assert torch.allclose(scores, torch.zeros(4), atol=0.05)
    same_size = torch.from_numpy(np.stack([np.asarray(images[0]), np.asarray(images[3])]))
    assert torch.equal(reward(same_size, ["", ""]), scores[[0, 3]])
    assert all(isinstance(found, list) for found in reward.detect(images))


def test_nsfw_options():
    assert NsfwPenalty(classes="FACE_MALE, FACE_FEMALE").classes == ("FACE_MALE", "FACE_FEMALE")
    with pytest.raises(ValueError, match="NudeNet classes"):
        rewards.load("nsfw", classes=["NOT_A_CLASS"])
    with pytest.raises(ValueError):
        rewards.load("nsfw", threshold=1.5)
    assert rewards.describe("nsfw").startswith("nsfw(classes=")
