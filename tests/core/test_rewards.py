import numpy as np
import pytest
import torch
from PIL import Image

from sfgrpo_core import rewards


def _images(count=3, seed=0):
    rng = np.random.default_rng(seed)
    smooth = np.zeros((64, 64, 3), np.uint8)
    noisy = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return torch.from_numpy(np.stack([smooth, noisy, smooth][:count]))


def test_registry_lists_builtins_and_rejects_unknown_names():
    names = rewards.available()
    assert {"jpeg_compressibility", "jpeg_incompressibility", "toy_mode"} <= set(names)
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'.*available"):
        rewards.load("no_such_reward")
    with pytest.raises(ValueError, match="bad options"):
        rewards.load("jpeg_compressibility", colour=3)


def test_jpeg_rewards_rank_smooth_above_noise_and_accept_pil():
    images = _images()
    compressibility = rewards.load("jpeg_compressibility")(images, ["a"] * 3)
    incompressibility = rewards.load("jpeg_incompressibility", quality=80)(images, ["a"] * 3)
    assert compressibility.dtype == torch.float32 and compressibility.shape == (3,)
    assert compressibility[0] > compressibility[1] and incompressibility[1] > incompressibility[0]
    pil = [Image.fromarray(image.numpy()) for image in images]
    torch.testing.assert_close(rewards.load("jpeg_compressibility")(pil, ["a"] * 3), compressibility)


def test_register_and_plain_callables():
    def brightness(images, prompts, metadata=None):
        return images.float().mean((1, 2, 3))

    rewards.register("test_brightness", lambda: brightness)
    assert "test_brightness" in rewards.available()
    scores = rewards.score(rewards.load("test_brightness"), _images(), ["a"] * 3).values
    assert scores.shape == (3,) and scores[1] > scores[0]

    def plain(images, prompts, metadata=None):
        return torch.ones(len(prompts))

    assert rewards.load(plain) is plain


def test_a_failing_image_is_missing_not_zero():
    def fragile(images, prompts, metadata=None):
        if any(prompt == "bad" for prompt in prompts):
            raise RuntimeError("cannot score this one")
        return torch.full((len(prompts),), 0.5)

    scores = rewards.score(fragile, _images(), ["ok", "bad", "ok"]).values
    assert torch.isnan(scores[1]) and (scores[[0, 2]] == 0.5).all()
    nan_scores = rewards.score(lambda images, prompts, metadata=None: torch.tensor([1.0, float("inf"), 2.0]),
                               _images(), ["a"] * 3).values
    assert torch.isnan(nan_scores[1]) and nan_scores[0] == 1.0


def test_a_reward_failing_everywhere_is_an_error():
    with pytest.raises(rewards.RewardError, match="toy world prompt 'a cat'"):
        rewards.score(rewards.load("toy_mode"), torch.zeros(2, 2), ["a cat", "a cat"])


def test_toy_mode_reward_peaks_at_the_asked_mode():
    from sfgrpo_core.models import toy

    reward = rewards.load("toy_mode")
    points = torch.stack([toy.MODE_CENTERS[3], toy.MODE_CENTERS[0]])
    scores = reward(points, ["mode 3", "mode 3"])
    assert scores[0] == 1.0 and scores[1] < 0.1
