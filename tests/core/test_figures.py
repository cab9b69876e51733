"""sfgrpo_core.training.figures: the step-reward figure is a real RGB image that depends on its data and
tolerates NaN."""

import numpy as np
import pytest

from sfgrpo_core.training.figures import MESSAGE_SIZE, STEP_FIGURE_SIZE, message_image, step_reward_figure

SIGMAS = np.array([1.0, 0.8, 0.55, 0.3, 0.1, 0.0])
REWARDS = np.array([[0.1, 0.2, 0.15, 0.5, 0.6, 0.6],
                    [0.0, 0.3, 0.4, 0.35, 0.8, 0.9]])


def _check_image(image: np.ndarray, size: tuple[int, int]) -> None:
    assert image.dtype == np.uint8 and image.shape == (size[1], size[0], 3)
    assert image.std() > 5  # not blank
    assert image.flags.writeable  # a copy, not a view of a canvas buffer that is freed with the figure


def test_step_reward_figure_is_an_rgb_image_that_depends_on_the_rewards():
    image = step_reward_figure(REWARDS, SIGMAS)
    _check_image(image, STEP_FIGURE_SIZE)
    changed = REWARDS.copy()
    changed[1, 2] = 0.05  # one gain turns from up to down
    other = step_reward_figure(changed, SIGMAS)
    assert np.abs(other.astype(int) - image.astype(int)).sum() > 0
    np.testing.assert_array_equal(step_reward_figure(REWARDS, SIGMAS), image)  # deterministic


def test_gain_markers_are_green_up_and_red_down():
    green_red = []
    for rewards in (np.linspace(0, 1, 6)[None], np.linspace(1, 0, 6)[None]):  # all gains up / all down
        image = step_reward_figure(rewards, SIGMAS).astype(int)
        red, green, blue = image[..., 0], image[..., 1], image[..., 2]
        greenish = (green > red + 60) & (green > blue + 40)
        reddish = (red > green + 60) & (red > blue + 60)
        green_red.append(greenish.sum() - reddish.sum())
    assert green_red[0] > 0 > green_red[1]


def test_nan_rewards_are_left_out_without_crashing():
    rewards = REWARDS.copy()
    rewards[0, 3] = np.nan
    rewards[1, 0] = np.inf  # non-finite counts as missing too
    _check_image(step_reward_figure(rewards, SIGMAS), STEP_FIGURE_SIZE)
    _check_image(step_reward_figure(np.full((2, 6), np.nan), SIGMAS), STEP_FIGURE_SIZE)
    _check_image(step_reward_figure(REWARDS[0], SIGMAS), STEP_FIGURE_SIZE)  # one trajectory as [K]


def test_mismatched_sigmas_are_refused():
    with pytest.raises(ValueError, match="^sigmas: 5 noise levels"):
        step_reward_figure(REWARDS, SIGMAS[:5])


def test_message_image():
    _check_image(message_image("no reward is connected"), MESSAGE_SIZE)
