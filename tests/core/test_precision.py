"""The dtype decision (sfgrpo_core.models.precision): bfloat16 on a CPU only where it is native and measured faster,
and every CPU path (the mini world's decode, the diffusers backend's default, the Train LoRA node's 'auto') follows
it."""

import pytest
import torch

from sfgrpo_core.models import precision


@pytest.fixture
def cpu_without_native_bfloat16(monkeypatch):
    """This process sees a CPU whose oneDNN has no bfloat16 (an AVX2-only EPYC, say); the timed probe must not run."""
    precision._bfloat16_pays.cache_clear()
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: False)
    monkeypatch.setattr(precision, "_probe_seconds", lambda dtype, repeats=3: pytest.fail("probe ran"))
    yield
    precision._bfloat16_pays.cache_clear()


@pytest.fixture
def cpu_with_native_bfloat16(monkeypatch):
    """A CPU with native bfloat16, whose probe times bfloat16 at ``speedup`` times faster than float32."""
    precision._bfloat16_pays.cache_clear()
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)

    def set_speedup(speedup: float) -> None:
        precision._bfloat16_pays.cache_clear()
        monkeypatch.setattr(precision, "_probe_seconds",
                            lambda dtype, repeats=3: 1.0 if dtype is None else 1.0 / speedup)

    yield set_speedup
    precision._bfloat16_pays.cache_clear()


def test_a_cpu_without_native_bfloat16_gets_float32(cpu_without_native_bfloat16):
    assert precision.fast_dtype("cpu") == torch.float32
    assert precision.fast_autocast_dtype("cpu") is None
    with precision.fast_autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_native_bfloat16_is_chosen_only_when_measured_faster(cpu_with_native_bfloat16):
    cpu_with_native_bfloat16(3.0)
    assert precision.fast_dtype("cpu") == torch.bfloat16 and precision.fast_autocast_dtype("cpu") == torch.bfloat16
    with precision.fast_autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    cpu_with_native_bfloat16(1.1)  # native, but within the margin: not worth the precision
    assert precision.fast_dtype("cpu") == torch.float32


def test_the_decision_is_cached_per_process_and_device(monkeypatch):
    precision._bfloat16_pays.cache_clear()
    calls = []
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: calls.append(1) or False)
    try:
        assert precision.fast_dtype("cpu") == precision.fast_dtype(torch.device("cpu")) == torch.float32
        assert len(calls) == 1
    finally:
        precision._bfloat16_pays.cache_clear()


def test_the_probe_times_both_dtypes():
    assert 0 < precision._probe_seconds(None, repeats=1) < 60
    assert 0 < precision._probe_seconds(torch.bfloat16, repeats=1) < 600


def test_the_mini_world_decodes_in_float32_where_float32_is_chosen(cpu_without_native_bfloat16):
    """Without native bfloat16 the mini world decodes with no autocast, and its images equal a plain float32
    decode of the same latents through the same VAE."""
    from sfgrpo_core.models import build

    world = build("miniworld")
    assert world.decode_dtype is None
    latents = torch.randn(3, *world.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = world.vae.decode(latents / world.vae_scaling_factor, return_dict=False)[0]
    expected = (reference.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(world.decode(latents), expected)


def test_bfloat16_decoding_stays_within_a_few_levels_of_float32():
    """What 'auto' trades where bfloat16 is chosen: the mini world's images move by a few of 255 levels."""
    from sfgrpo_core.models import build

    world = build("miniworld")
    latents = torch.randn(2, *world.sample_shape, generator=torch.Generator().manual_seed(1))
    world.decode_dtype = None
    float32 = world.decode(latents)
    world.decode_dtype = torch.bfloat16
    bfloat16 = world.decode(latents)
    assert (float32.int() - bfloat16.int()).abs().float().mean() < 3.0


def test_the_diffusers_backend_default_dtype_follows_the_decision(cpu_with_native_bfloat16):
    from sfgrpo_core.models.diffusers_backend import _resolve_dtype

    cpu_with_native_bfloat16(3.0)
    assert _resolve_dtype(None, "cpu") == torch.bfloat16
    cpu_with_native_bfloat16(1.0)
    assert _resolve_dtype(None, "cpu") == torch.float32
    assert _resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit dtype is kept


def test_describe_names_the_capability_and_the_choice(cpu_without_native_bfloat16):
    described = precision.describe("cpu")
    assert described == {"cpu_capability": precision.cpu_capability(), "cpu_native_bfloat16": False,
                         "device": "cpu", "fast_dtype": "float32"}
