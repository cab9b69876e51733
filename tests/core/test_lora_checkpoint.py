import json

import pytest
import torch

from sfgrpo_core.config import Config
from sfgrpo_core.lora import adapters as lora
from sfgrpo_core.models.toy import ToyVelocityNet
from sfgrpo_core.training import checkpoint


def _net():
    torch.manual_seed(0)
    return ToyVelocityNet(hidden=16)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(5, 2, generator=generator), torch.rand(5, generator=generator), torch.eye(8)[:5]


def test_fresh_lora_is_the_base_and_disabling_gives_the_base_back():
    net = _net()
    x, sigma, condition = _inputs()
    base = net(x, sigma, condition)
    parameters = lora.attach_lora(net, rank=4, alpha=8, target_modules=["input", "output"])
    assert parameters and all(p.requires_grad for p in parameters)
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(net(x, sigma, condition), base)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.1)
    assert not torch.allclose(net(x, sigma, condition), base)
    with lora.adapter_disabled(net):
        torch.testing.assert_close(net(x, sigma, condition), base)
    assert all(p.requires_grad for p in parameters)


def test_unknown_targets_are_reported():
    with pytest.raises(ValueError, match="lora.target_modules"):
        lora.attach_lora(_net(), rank=2, alpha=2, target_modules=["to_q"])


def test_save_and_reload_reproduces_outputs(tmp_path):
    net = _net()
    parameters = lora.attach_lora(net, rank=4, alpha=8, target_modules=["input", "hidden1"])
    with torch.no_grad():
        for parameter in parameters:
            parameter.normal_()
    path = lora.save_lora(tmp_path / "a.safetensors", net, rank=4, alpha=8, target_modules=["input", "hidden1"])
    weights, metadata = lora.read_lora(path)
    assert metadata["rank"] == "4" and json.loads(metadata["target_modules"]) == ["input", "hidden1"]
    other = _net()
    lora.attach_lora(other, rank=4, alpha=8, target_modules=["input", "hidden1"], seed=5)
    lora.load_lora_state_dict(other, weights)
    x, sigma, condition = _inputs()
    torch.testing.assert_close(other(x, sigma, condition), net(x, sigma, condition))
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_lora_state_dict(other, {"nope.lora_A.weight": torch.zeros(1)})


def test_checkpoint_roundtrip_keeps_everything_and_prunes(tmp_path):
    net = _net()
    parameters = lora.attach_lora(net, rank=2, alpha=2, target_modules=["output"])
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    x, sigma, condition = _inputs()
    for _ in range(2):
        net(x, sigma, condition).pow(2).mean().backward()
        optimizer.step()
    for iteration in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, iteration, Config(), lora.lora_state_dict(net), optimizer.state_dict(),
                                   keep=2)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["iter_000002", "iter_000003"]
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "iter_000003"
    global_state = torch.get_rng_state()
    restored = checkpoint.load_checkpoint(latest)
    # Every draw of a run uses derived seeds: loading leaves the process's global RNG (ComfyUI's too) alone.
    assert torch.equal(torch.get_rng_state(), global_state)
    assert restored.iteration == 3 and restored.config == Config()
    fresh = torch.optim.AdamW(parameters, lr=1e-2)
    fresh.load_state_dict(restored.optimizer_state)
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(fresh.state_dict()["state"][key][name], value)
    assert not any(p.suffix == ".pkl" or p.suffix == ".pt" for p in latest.iterdir())


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    net = _net()
    parameters = lora.attach_lora(net, rank=2, alpha=2, target_modules=["output"])
    optimizer = torch.optim.AdamW(parameters)
    checkpoint.save_checkpoint(tmp_path, 1, Config(), lora.lora_state_dict(net), optimizer.state_dict())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "atomic_write_text", crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 2, Config(), lora.lora_state_dict(net), optimizer.state_dict())
    assert checkpoint.latest_checkpoint(tmp_path).name == "iter_000001"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["iter_000001"]


class _Fused(torch.nn.Module):
    """q, k, v stacked in one Linear (as ComfyUI keeps them), and a separate head."""

    def __init__(self, width: int, sizes: tuple[int, ...]):
        super().__init__()
        self.qkv = torch.nn.Linear(width, sum(sizes))
        self.head = torch.nn.Linear(sum(sizes), 1)

    def forward(self, x):
        return self.head(torch.tanh(self.qkv(x)))


class _Separate(torch.nn.Module):
    """The same network with one Linear per projection (as diffusers keeps them)."""

    def __init__(self, fused: _Fused, sizes: tuple[int, ...]):
        super().__init__()
        self.parts = torch.nn.ModuleList()
        start = 0
        for size in sizes:
            part = torch.nn.Linear(fused.qkv.in_features, size)
            part.load_state_dict({"weight": fused.qkv.weight[start : start + size],
                                  "bias": fused.qkv.bias[start : start + size]})
            self.parts.append(part)
            start += size
        self.head = torch.nn.Linear(sum(sizes), 1)
        self.head.load_state_dict(fused.head.state_dict())

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([part(x) for part in self.parts], dim=-1)))


def test_a_fused_linear_trains_one_adapter_per_projection_like_separate_linears():
    """attach_lora(fused=...) gives a fused q/k/v Linear the parametrization of three separate ones: with the same A
    matrices, AdamW steps on the same loss keep both networks equal, and lora_B stays block-diagonal."""
    sizes, rank, width = (6, 6, 4), 2, 5
    torch.manual_seed(0)
    fused = _Fused(width, sizes)
    separate = _Separate(fused, sizes)
    trained = {
        "fused": lora.attach_lora(fused, rank=rank, alpha=3.0, target_modules=["qkv"], fused={"qkv": sizes}),
        "separate": lora.attach_lora(separate, rank=rank, alpha=3.0, target_modules=["parts.0", "parts.1", "parts.2"]),
    }
    with torch.no_grad():  # the same initial A: the separate adapters' A matrices stacked
        fused.qkv.lora_A["default"].weight.copy_(torch.cat([part.lora_A["default"].weight for part in separate.parts]))
    assert fused.qkv.lora_A["default"].weight.shape == (3 * rank, width)
    optimizers = {name: torch.optim.AdamW(parameters, lr=0.05) for name, parameters in trained.items()}
    x = torch.randn(32, width, generator=torch.Generator().manual_seed(1))
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))
    for _ in range(5):
        for name, network in (("fused", fused), ("separate", separate)):
            optimizers[name].zero_grad()
            ((network(x) - target) ** 2).mean().backward()
            optimizers[name].step()
    up = fused.qkv.lora_B["default"].weight.detach()
    assert up.abs().sum() > 0
    assert torch.equal(up * (1 - lora.block_diagonal_mask(sizes, rank)), torch.zeros_like(up))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), separate(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        lora.attach_lora(_Fused(width, sizes), rank=rank, alpha=3.0, target_modules=["qkv"], fused={"qkv": (8, 9)})
