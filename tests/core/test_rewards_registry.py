"""The one reward registry: plug-ins through entry points, one table for every copy of the package, weighted mixes
and their two aggregations, and errors that stop a run instead of marking images missing."""

import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sfgrpo_core import rewards
from sfgrpo_core.algorithm import advantages
from sfgrpo_core.rewards.weighted import Weighted
from sfgrpo_core.training import credit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _images(count=4, seed=0):
    rng = np.random.default_rng(seed)
    smooth = np.full((count, 32, 32, 3), 90, np.uint8)
    noisy = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return torch.from_numpy(np.where(np.arange(count)[:, None, None, None] % 2 == 0, smooth, noisy))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=300)


def test_every_shipped_reward_is_listed_and_described():
    names = rewards.available()
    for name in ("mini_geneval", "jpeg_compressibility", "jpeg_incompressibility", "toy_mode", "weighted",
                 "ocr_pickscore", "remote", "ocr", "nsfw", "pickscore", "clip", "aesthetic", "hps", "imagereward"):
        assert name in names, name
    assert rewards.describe("jpeg_compressibility").startswith("jpeg_compressibility(quality=95): ")
    assert "aggregate='sum'" in rewards.describe("weighted")
    with pytest.raises(ValueError, match=r"bad options.*its options: jpeg_compressibility\(quality=95\)"):
        rewards.load("jpeg_compressibility", colour=3)


def test_an_installed_package_adds_rewards_through_the_entry_point_group(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        import torch

        class Brightness:
            """Mean pixel value in 0..1."""

            def __init__(self, scale=1.0):
                self.scale = scale

            def __call__(self, images, prompts, metadata=None):
                return self.scale * images.float().mean((1, 2, 3)) / 255
    '''))
    info = tmp_path / "my_rewards-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sfgrpo.rewards]\nmy_brightness = my_rewards:Brightness\n"
                                           "my_broken = my_rewards_not_installed:Nothing\n")
    result = _python('''
        import torch
        from sfgrpo_core import rewards
        print(rewards.describe("my_brightness"))
        white = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
        print(float(rewards.load("my_brightness", scale=2.0)(white, [""])[0]))
        try:
            rewards.load("my_broken")
        except ValueError as error:
            print("ERROR", error)
    ''', PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    described, value, error = result.stdout.strip().splitlines()
    assert described == "my_brightness(scale=1.0): Mean pixel value in 0..1."
    assert float(value) == 2.0
    assert "my_broken" in error and "my_rewards_not_installed:Nothing" in error and "my-rewards" in error


def test_a_copy_of_the_package_under_another_name_shares_the_registry():
    # What ComfyUI does: it imports the pack folder as a package of its own name, so the nodes' sfgrpo_core.rewards
    # is a second module object. A reward registered through `import sfgrpo_core` must be visible there too.
    result = _python(f'''
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("pack_copy", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["pack_copy"] = pack
        spec.loader.exec_module(pack)
        import importlib
        copy = importlib.import_module("pack_copy.sfgrpo_core.rewards")
        from sfgrpo_core import rewards
        assert copy is not rewards
        rewards.register("registered_by_user", lambda: (lambda images, prompts, metadata=None: images))
        copy.register("registered_by_pack", lambda: (lambda images, prompts, metadata=None: images))
        print("registered_by_user" in copy.available(), "registered_by_pack" in rewards.available())
    ''')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_a_user_registration_wins_over_a_builtin_of_the_same_name():
    original = rewards._REGISTRY["toy_mode"]
    try:
        rewards.register("toy_mode", lambda: "mine")
        rewards.register("toy_mode", original, replace=False)  # what a second import of the built-ins does
        assert rewards.load("toy_mode") == "mine"
    finally:
        rewards.register("toy_mode", original)


def test_an_input_error_stops_instead_of_marking_missing():
    def needs_quotes(images, prompts, metadata=None):
        if any('"' not in prompt for prompt in prompts):
            raise rewards.RewardInputError(f"prompt {prompts[0]!r} has no quoted text")
        return torch.ones(len(prompts))

    with pytest.raises(rewards.RewardInputError, match="no quoted text"):
        rewards.score(needs_quotes, _images(2), ['"ok"', "not quoted"])


def test_weighted_sum_equals_its_hand_computation_and_keeps_every_component():
    images, prompts = _images(), [""] * 4
    mix = rewards.load("weighted", components={"jpeg_compressibility": 0.3, "jpeg_incompressibility": 2.0},
                       options={"jpeg_incompressibility": {"quality": 80}})
    scored = rewards.score(mix, images, prompts)
    small = rewards.load("jpeg_compressibility")(images, prompts)
    large = rewards.load("jpeg_incompressibility", quality=80)(images, prompts)
    torch.testing.assert_close(scored.values, 0.3 * small + 2.0 * large)
    assert set(scored.components) == {"jpeg_compressibility", "jpeg_incompressibility"}
    torch.testing.assert_close(scored.components["jpeg_incompressibility"], large)
    assert mix.advantage_weights is None  # "sum": the trainer normalizes the mix itself


def test_a_component_that_fails_on_one_image_marks_only_that_image_missing():
    def fails_on_noise(images, prompts, metadata=None):
        if images.float().std() > 40:
            raise RuntimeError("cannot score noise")
        return torch.ones(len(prompts))

    rewards.register("test_fails_on_noise", lambda: fails_on_noise)
    mix = rewards.load("weighted", components={"test_fails_on_noise": 1.0, "jpeg_compressibility": 1.0})
    scored = rewards.score(mix, _images(), [""] * 4)
    assert torch.isnan(scored.values[1::2]).all() and torch.isfinite(scored.values[0::2]).all()
    assert torch.isnan(scored.components["test_fails_on_noise"][1::2]).all()
    assert torch.isfinite(scored.components["jpeg_compressibility"]).all()


@pytest.mark.parametrize("bad, field", [
    ({"components": {}}, "components"),
    ({"components": {"jpeg_compressibility": float("nan")}}, "components.jpeg_compressibility"),
    ({"components": {"jpeg_compressibility": float("inf")}}, "components.jpeg_compressibility"),
    ({"components": {"no_such_reward": 1.0}}, "components.no_such_reward"),
    ({"components": {"jpeg_compressibility": 1.0}, "aggregate": "mean"}, "aggregate"),
    ({"components": {"jpeg_compressibility": 1.0}, "options": {"toy_mode": {}}}, "options"),
])
def test_weighted_refuses_bad_options_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Weighted(**bad)


def test_normalize_then_sum_weights_each_components_own_advantages():
    torch.manual_seed(0)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    first, second = torch.rand(6, 1), 100 * torch.rand(6, 1)  # very different scales
    scores = rewards.Scores((0.5 * first + 0.5 * second), {"first": first, "second": second})

    class Mix:
        advantage_weights = {"first": 0.5, "second": 0.5}

    def advantages_of(final):
        return advantages.flow_grpo_advantages(final[:, 0], group_ids)[:, None]

    mixed = credit._mixed(advantages_of, scores, Mix())
    expected = 0.5 * advantages_of(first) + 0.5 * advantages_of(second)
    torch.testing.assert_close(mixed, expected)
    # Normalizing the sum instead lets the large component decide alone.
    assert not torch.allclose(credit._mixed(advantages_of, scores, object()), expected)


def test_the_ocr_preset_is_the_papers_recipe():
    described = rewards.describe("ocr_pickscore")
    assert "0.8 ocr + 0.2 pickscore" in described
    with pytest.raises(ValueError, match="components.pickscore"):  # no PickScore weights offline: named clearly
        rewards.load("ocr_pickscore", pickscore={"model": "/nonexistent/pickscore"})


def test_cli_lists_rewards_with_their_options():
    result = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", "rewards"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split("(")[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {name for name in rewards.available() if not name.startswith("test_")}  # tests' own
    assert lines["remote"].startswith("remote(url='http://127.0.0.1:8790', timeout=120.0")
