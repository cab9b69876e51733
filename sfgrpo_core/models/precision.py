"""Which compute dtype pays on a device: the one place that chooses between bfloat16 and float32.

bfloat16 is the fast dtype on CUDA cards that support it. On a CPU it is fast only where the hardware has it
(AVX512-BF16 or AMX, as oneDNN reports): elsewhere torch emulates it, and a TAESD decode of the mini world takes
235 ms an image in bfloat16 against 31 ms in float32 (AMD EPYC, AVX2). So a CPU gets bfloat16 only when oneDNN
reports native support AND a short timed probe measures it faster; the decision is cached per process and device.
"""

from __future__ import annotations

import functools
import time

import torch

# bfloat16 must beat float32 by this factor in the probe: a near tie is not worth the precision it costs.
REQUIRED_SPEEDUP = 1.25


def cpu_capability() -> str:
    """The SIMD level torch dispatches to on this CPU ("AVX512", "AVX2", "DEFAULT", ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matmuls natively on this CPU (AVX512-BF16 or AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a torch built without oneDNN
        return False


def _probe_seconds(dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of a small TAESD-like convolution stack on 64x64 images, channels-last, under
    autocast with ``dtype`` (None: plain float32)."""
    generator = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU())
                                   for _ in range(3)]).to(memory_format=torch.channels_last)
    images = torch.randn(8, 64, 64, 64, generator=generator).to(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        layers(images)  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(repeats):
            start = time.perf_counter()
            layers(images)
            best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _bfloat16_pays(device_type: str, device_index: int | None) -> bool:
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return cpu_has_native_bfloat16() and _probe_seconds(torch.bfloat16) * REQUIRED_SPEEDUP < _probe_seconds(None)
    return False


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """torch.bfloat16 where it is native and faster on ``device``, otherwise torch.float32.

    CUDA: bfloat16 when the card supports it. CPU: bfloat16 only with native support (``cpu_has_native_bfloat16``)
    and a timed probe ``REQUIRED_SPEEDUP`` times faster than float32. Other devices: float32. Cached per process
    and device, so every path of a run makes the same choice.
    """
    device = torch.device(device)
    return torch.bfloat16 if _bfloat16_pays(device.type, device.index) else torch.float32


def fast_autocast_dtype(device: str | torch.device = "cpu") -> torch.dtype | None:
    """The dtype to autocast a decoder to on ``device``: ``fast_dtype`` when it is not float32, else None (no
    autocast: plain float32)."""
    dtype = fast_dtype(device)
    return None if dtype == torch.float32 else dtype


def describe(device: str | torch.device = "cpu") -> dict[str, str | bool]:
    """What a benchmark prints beside its figures: the CPU capability, native bfloat16, the chosen dtype."""
    return {"cpu_capability": cpu_capability(), "cpu_native_bfloat16": cpu_has_native_bfloat16(),
            "device": str(torch.device(device)), "fast_dtype": str(fast_dtype(device)).removeprefix("torch.")}


def fast_autocast(device: str | torch.device = "cpu") -> torch.autocast:
    """torch.autocast to ``fast_dtype(device)`` on ``device``; disabled (plain float32) where that is float32."""
    dtype = fast_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
