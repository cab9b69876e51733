"""Rewards backed by vision-language models: PickScore, CLIPScore, LAION aesthetic, HPSv2.1, ImageReward.

Each one loads the weights flow_grpo (yifan123/flow_grpo, ``flow_grpo/rewards.py`` and its ``*_scorer.py``) loads,
preprocesses images the way its scorer does and scales the score the same way, so that numbers can be compared with
theirs; the class docstrings say how. All of them take a list of PIL images or a uint8 tensor [B, H, W, 3] and
return float32 CPU scores [B].

Nothing heavy is imported here: transformers (pip extra ``clip``), open_clip (extra ``hps``) and image-reward (extra
``imagereward``) are imported when a reward is built, and a missing one raises MissingExtraError naming the extra.
A model named by a Hugging Face hub id is read from the local hub cache first (no network), then downloaded; if it
is neither cached nor reachable (offline), building the reward raises a ValueError that names the reward, the option
and the fix, instead of a deep traceback. ``HF_HUB_OFFLINE=1`` skips the download attempt, and so does a hub host
that refuses a TCP connection (``hub_reachable``).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from . import MissingExtraError, TorchReward, batch_size_of, register, require
from .builtin import to_pil_images

log = logging.getLogger(__name__)

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The ids flow_grpo loads.
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HPS_REPO, HPS_V21_FILE, HPS_ARCH = "xswu/HPSv2", "HPS_v2.1_compressed.pt", "ViT-H-14"
IMAGEREWARD_REPO, IMAGEREWARD_FILE, IMAGEREWARD_MED_CONFIG = "THUDM/ImageReward", "ImageReward.pt", "med_config.json"

# Divisors flow_grpo applies to logit_scale.exp() * cosine (PickScore "norm to 0-1"; CLIPScore logits_per_image / 30).
PICKSCORE_DIVISOR = 26.0
CLIPSCORE_DIVISOR = 30.0
# open_clip's OPENAI_DATASET_MEAN / STD: what hpsv2 normalises with (ViT-H-14 laion2B-s32B-b79K's preprocessing).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------- options


def parse_dtype(reward: str, dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype named by ``dtype`` ("float32", "float16", "bfloat16" or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"reward {reward!r}: dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_batch_size(reward: str, batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reward {reward!r}: batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def _check_prompts(reward: str, images: Any, prompts: Sequence[str]) -> int:
    count = batch_size_of(images)
    if len(prompts) != count:
        raise ValueError(f"reward {reward!r}: {len(prompts)} prompts for {count} images")
    return count


# ----------------------------------------------------------------------------------------------------- hub access


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (read at call time, unlike huggingface_hub's constant)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (HF_ENDPOINT's) accepts a TCP connection within ``timeout`` seconds: checked before a
    download, so that a machine without network gets the clear error at once instead of after huggingface_hub's
    minutes of retries. True without checking when an HTTPS proxy is configured (the host may only be reachable
    through it)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except ImportError:
        return True
    if not endpoint.hostname:
        return True
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def _local_path(value: str) -> Path | None:
    path = Path(value).expanduser()
    return path if path.exists() else None


def _looks_like_path(value: str) -> bool:
    """A value that can only be a file-system path (a hub id is 'name' or 'owner/name')."""
    return value.startswith(("/", ".", "~", "\\")) or value.count("/") > 1 or "\\" in value or value[1:3] == ":\\"


def hub_error(reward: str, option: str, value: str, error: BaseException | None = None,
              what: str = "the weights") -> ValueError:
    """The ValueError for a hub id that is neither cached nor reachable: names the reward, the option and the fix."""
    cause = ""
    if error is not None:
        lines = str(error).strip().splitlines()
        cause = f" ({type(error).__name__}: {lines[0] if lines else ''})"
    return ValueError(
        f"reward {reward!r}: cannot load {option}={value!r}: it is not a local path, and the Hugging Face hub repo "
        f"is neither in the local hub cache nor reachable{cause}. Fix: pass {option}=<a local folder with "
        f"{what}> (for example one made with `hf download {value} --local-dir DIR` on a machine that is online), "
        f"or download it into the hub cache first (`hf download {value}`), after which it loads offline.")


def load_pretrained(reward: str, option: str, value: str, loader: Callable[..., T], what: str = "the weights",
                    **kwargs: Any) -> T:
    """``loader(value, **kwargs)`` (a transformers ``from_pretrained``) for a local folder or a hub id.

    A local path is loaded as it is (its errors are real errors). A hub id is first read from the hub cache with
    ``local_files_only=True`` (no network); failing that, and unless HF_HUB_OFFLINE is set, downloaded. An id that
    is neither cached nor reachable (HF_HUB_OFFLINE, or ``hub_reachable`` False) raises ``hub_error``'s ValueError
    (``what``: what the folder should hold).
    """
    path = _local_path(value)
    if path is not None:
        return loader(str(path), **kwargs)
    if _looks_like_path(value):
        raise ValueError(f"reward {reward!r}: {option}={value!r} does not exist (neither a folder nor a hub id)")
    try:
        return loader(value, local_files_only=True, **kwargs)
    except OSError as cache_error:
        if hub_offline() or not hub_reachable():
            raise hub_error(reward, option, value, cache_error, what) from None
    try:
        return loader(value, **kwargs)
    except OSError as error:
        raise hub_error(reward, option, value, error, what) from None


def resolve_file(reward: str, option: str, value: str, filename: str) -> Path:
    """The path of ``filename`` for option ``value``: the file itself, ``value/filename`` for a local folder, or the
    hub repo ``value``'s copy (hub cache first, then a download unless HF_HUB_OFFLINE is set or the hub is not
    ``hub_reachable``).

    Raises:
        ValueError: a local folder without the file, or a hub repo neither cached nor reachable (``hub_error``).
    """
    path = _local_path(value)
    if path is not None:
        if path.is_file():
            return path
        if (path / filename).is_file():
            return path / filename
        present = sorted(child.name for child in path.iterdir())[:20]
        raise ValueError(f"reward {reward!r}: {option}={value!r} is a folder without {filename!r} "
                         f"(it holds: {', '.join(present) or 'nothing'})")
    if _looks_like_path(value):
        raise ValueError(f"reward {reward!r}: {option}={value!r} does not exist (not a file, a folder or a hub id)")
    huggingface_hub = require("huggingface_hub", reward if reward in ("hps", "imagereward") else "clip", reward)
    try:
        return Path(huggingface_hub.hf_hub_download(value, filename, local_files_only=True))
    except Exception as cache_error:  # huggingface_hub's "not in the cache" errors have no common base class
        if hub_offline() or not hub_reachable():
            raise hub_error(reward, option, value, cache_error, f"the file {filename!r}") from None
    try:
        return Path(huggingface_hub.hf_hub_download(value, filename))
    except Exception as error:  # the only work done here is the download: any failure is a hub failure
        raise hub_error(reward, option, value, error, f"the file {filename!r}") from None


def load_state_dict(reward: str, option: str, path: Path) -> dict[str, torch.Tensor]:
    """Tensors name -> tensor from a ``.safetensors`` file, or a torch file read with ``weights_only=True`` (never a
    plain pickle); a ``{"state_dict": ...}`` checkpoint is unwrapped and a DataParallel ``module.`` prefix dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only's refusal is a pickle.UnpicklingError; a torn file, others
            raise ValueError(
                f"reward {reward!r}: {option}: {path} cannot be read with torch.load(weights_only=True) ({error}); "
                "this project reads no other pickles. Convert it once, in an environment you trust, to safetensors "
                "(safetensors.torch.save_file(state_dict, 'weights.safetensors')) and pass that file") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"reward {reward!r}: {option}: {path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


# ----------------------------------------------------------------------------------------------------- images


def resize_like_torchvision(pixels: torch.Tensor, size: int | tuple[int, int], mode: str) -> torch.Tensor:
    """torchvision ``Resize(size, mode, antialias=True)`` of a float tensor [C, H, W] (its default since 0.17): an int
    sets the shorter edge (the longer one is ``int(size * long / short)``), a pair is (height, width)."""
    height, width = pixels.shape[-2:]
    if isinstance(size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_height, new_width = size
    if (new_height, new_width) == (height, width):
        return pixels
    return torch.nn.functional.interpolate(pixels[None], size=(new_height, new_width), mode=mode,
                                           align_corners=False, antialias=True)[0]


def center_crop_like_torchvision(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` of a tensor [C, H, W] at least ``size`` (height, width) large."""
    height, width = pixels.shape[-2:]
    crop_height, crop_width = size
    if crop_height > height or crop_width > width:
        raise ValueError(f"cannot centre-crop {height}x{width} pixels to {crop_height}x{crop_width}")
    top, left = int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
    return pixels[..., top : top + crop_height, left : left + crop_width]


def resize_longest_and_pad(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """hpsv2's ResizeMaxSize on a float tensor [C, H, W]: bicubic (antialiased) resize so the longer edge is ``side``
    (the other ``round(edge * scale)``), then zero padding to [C, side, side], half on each side (the odd pixel on
    the right/bottom)."""
    height, width = pixels.shape[-2:]
    scale = side / float(max(height, width))
    if scale != 1.0:
        pixels = resize_like_torchvision(pixels, (round(height * scale), round(width * scale)), "bicubic")
    pad_height, pad_width = side - pixels.shape[-2], side - pixels.shape[-1]
    if pad_height or pad_width:
        pixels = torch.nn.functional.pad(pixels, (pad_width // 2, pad_width - pad_width // 2,
                                                  pad_height // 2, pad_height - pad_height // 2), value=0.0)
    return pixels


def image_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as float32 [3, H, W] in [0, 1] (torchvision's ToTensor)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _size_of(value: Any) -> int | tuple[int, int]:
    """An image processor's size as an int (shorter edge) or (height, width), from an int, dict or SizeDict."""
    if isinstance(value, int):
        return value
    fields: Mapping[str, Any] = value if isinstance(value, Mapping) else {
        key: getattr(value, key, None) for key in ("height", "width", "shortest_edge")}
    if fields.get("height") is not None and fields.get("width") is not None:
        return int(fields["height"]), int(fields["width"])
    if fields.get("shortest_edge") is not None:
        return int(fields["shortest_edge"])
    raise ValueError(f"unsupported image processor size {value!r}")


def clip_transform_config(image_processor: Any) -> dict[str, Any]:
    """What flow_grpo's ClipScorer reads from the CLIP image processor: resize (shorter edge), crop, mean/std."""
    config = image_processor.to_dict()
    crop = _size_of(config["crop_size"]) if config.get("do_center_crop") else None
    return {
        "resize": _size_of(config["size"]) if config.get("do_resize") else None,
        "crop": (crop, crop) if isinstance(crop, int) else crop,
        "mean": tuple(config["image_mean"]) if config.get("do_normalize") else None,
        "std": tuple(config["image_std"]) if config.get("do_normalize") else None,
    }


def transform_unit_images(images: Sequence[torch.Tensor], resize: int | tuple[int, int] | None,
                          crop: tuple[int, int] | None, mean: Sequence[float] | None, std: Sequence[float] | None,
                          mode: str) -> torch.Tensor:
    """[B, 3, h, w] float32 pixels from images [3, H, W] in [0, 1]: resize (``mode``: 'bilinear' or 'bicubic',
    antialiased like torchvision), centre crop, then (x - mean) / std."""
    out = []
    for pixels in images:
        if resize is not None:
            pixels = resize_like_torchvision(pixels, resize, mode)
        if crop is not None:
            pixels = center_crop_like_torchvision(pixels, crop)
        out.append(pixels)
    batch = torch.stack(out)
    if mean is not None and std is not None:
        batch = (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return batch


def features(output: Any) -> torch.Tensor:
    """Projected CLIP features [B, D] from ``get_image_features``/``get_text_features``: a tensor in transformers 4,
    a BaseModelOutputWithPooling whose ``pooler_output`` is the projection in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(p=2, dim=-1, keepdim=True)


def _clip_processor_loader(transformers: Any, auto: bool) -> Callable[..., Any]:
    """``from_pretrained`` of the CLIP processor with the PIL image backend in transformers >= 5 (transformers 4's
    default, which flow_grpo used: PIL bicubic resize), so pixel values match flow_grpo's."""
    cls = transformers.AutoProcessor if auto else transformers.CLIPProcessor
    major = int(transformers.__version__.split(".")[0])
    extra = {"backend": "pil"} if major >= 5 else {}
    return lambda path, **kwargs: cls.from_pretrained(path, **extra, **kwargs)


def _score_in_chunks(count: int, batch_size: int, score: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``score(part)`` of each run of at most ``batch_size`` of ``count`` items, concatenated: [count] float32, CPU."""
    parts = [score(slice(start, min(start + batch_size, count))).float().cpu()
             for start in range(0, count, batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------- PickScore


class PickScore(TorchReward):
    """PickScore v1 (a CLIP-H preference model): logit_scale.exp() * cos(text, image) / 26 as flow_grpo (~0.8-0.9).

    As flow_grpo's PickScoreScorer: AutoProcessor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PIL bicubic resize to
    224, centre crop, CLIP mean/std; text padded to the batch's longest, truncated at 77 tokens), AutoModel
    ``yuvalkirstain/PickScore_v1`` (a CLIPModel); get_image_features / get_text_features, L2-normalised, the
    diagonal of logit_scale.exp() * text @ image.T, divided by 26. Needs the pip extra ``clip`` (transformers).

    Args:
        model: hub id or local folder of the CLIPModel weights.
        processor: hub id or local folder of the CLIPProcessor (tokenizer + image processor).
        device: where to score; ``to(device)`` moves it later.
        dtype: "float32" (flow_grpo's), "float16" or "bfloat16".
        batch_size: images per forward pass.
    """

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16):
        transformers = require("transformers", "clip", "pickscore")
        self.dtype = parse_dtype("pickscore", dtype)
        self.batch_size = _check_batch_size("pickscore", batch_size)
        self.processor = load_pretrained("pickscore", "processor", processor,
                                         _clip_processor_loader(transformers, auto=True), "the processor files")
        # flow_grpo's AutoModel resolves PickScore_v1 to CLIPModel; naming the class skips AutoModel's PEFT adapter
        # look-up, which in transformers 5 goes online even with local_files_only=True.
        self.model = load_pretrained("pickscore", "model", model, transformers.CLIPModel.from_pretrained)
        self.model.eval().requires_grad_(False).to(self.dtype)
        self.to(device)

    def torch_modules(self) -> list[torch.nn.Module]:
        """The CLIP model."""
        return [self.model]

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 (CPU) of images (PIL list or uint8 [B, H, W, 3]) against their prompts [B]."""
        count = _check_prompts("pickscore", images, prompts)
        pil = to_pil_images(images)

        def score(part: slice) -> torch.Tensor:
            pixels = self.processor(images=pil[part], return_tensors="pt")["pixel_values"]
            text = self.processor(text=list(prompts[part]), padding=True, truncation=True, max_length=77,
                                  return_tensors="pt")
            image_embeds = _normalise(features(self.model.get_image_features(
                pixel_values=pixels.to(self.device, self.dtype))))
            text_embeds = _normalise(features(self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device))))
            cosine = (image_embeds * text_embeds).sum(-1)
            return (self.model.logit_scale.exp() * cosine / PICKSCORE_DIVISOR)

        return _score_in_chunks(count, self.batch_size, score)


# ----------------------------------------------------------------------------------------------------- CLIPScore


class ClipScore(TorchReward):
    """CLIPScore of CLIP ViT-L/14: logit_scale.exp() * cos(text, image) / 30 (= 100 cos / 30), flow_grpo's clipscore.

    As flow_grpo's ClipScorer: CLIPModel + CLIPProcessor ``openai/clip-vit-large-patch14``; the images go through
    torchvision-style tensor transforms built from the processor's config (bilinear antialiased resize of the shorter
    edge to 224, centre crop 224, CLIP mean/std, on [0, 1] pixels), the prompts are padded to 77 tokens, and the score
    is ``logits_per_image.diagonal() / 30`` (logits_per_image = logit_scale.exp() * cosine; logit_scale.exp() is
    100 for the OpenAI weights, so typical scores are 0.5-1.2). Needs the pip extra ``clip`` (transformers).

    Args:
        model: hub id or local folder of the CLIPModel weights.
        processor: hub id or local folder of the CLIPProcessor; None: the ``model`` one (as flow_grpo).
        device: where to score; ``to(device)`` moves it later.
        dtype: "float32" (flow_grpo's), "float16" or "bfloat16".
        batch_size: images per forward pass.
    """

    def __init__(self, model: str = CLIP_L14, processor: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16):
        transformers = require("transformers", "clip", "clip")
        self.dtype = parse_dtype("clip", dtype)
        self.batch_size = _check_batch_size("clip", batch_size)
        self.processor = load_pretrained("clip", "processor" if processor else "model", processor or model,
                                         _clip_processor_loader(transformers, auto=False),
                                         "the processor files" if processor else "the weights and processor files")
        self.transform = clip_transform_config(self.processor.image_processor)
        self.model = load_pretrained("clip", "model", model, transformers.CLIPModel.from_pretrained)
        self.model.eval().requires_grad_(False).to(self.dtype)
        self.to(device)

    def torch_modules(self) -> list[torch.nn.Module]:
        """The CLIP model."""
        return [self.model]

    def pixels(self, images: Any) -> torch.Tensor:
        """flow_grpo's ClipScorer preprocessing: float32 pixels [B, 3, 224, 224] of images (PIL or uint8 [B,H,W,3])."""
        return transform_unit_images([image_to_unit_tensor(image) for image in to_pil_images(images)],
                                     mode="bilinear", **self.transform)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 (CPU) of images (PIL list or uint8 [B, H, W, 3]) against their prompts [B]."""
        count = _check_prompts("clip", images, prompts)
        pil = to_pil_images(images)

        def score(part: slice) -> torch.Tensor:
            pixels = self.pixels(pil[part]).to(self.device, self.dtype)
            text = self.processor(text=list(prompts[part]), padding="max_length", truncation=True, max_length=77,
                                  return_tensors="pt")
            image_embeds = _normalise(features(self.model.get_image_features(pixel_values=pixels)))
            text_embeds = _normalise(features(self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device))))
            cosine = (image_embeds * text_embeds).sum(-1)
            return (self.model.logit_scale.exp() * cosine / CLIPSCORE_DIVISOR)

        return _score_in_chunks(count, self.batch_size, score)


# ----------------------------------------------------------------------------------------------------- aesthetic


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP: [B, in_features] L2-normalised CLIP image embeddings -> [B] scores.

    Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
    Linear(16, 1), no activations, in one ``layers`` Sequential: the key names (layers.0/2/4/6/7.weight/bias) of
    ``sac+logos+ava1-l14-linearMSE.pth``. The dropouts are identity in eval mode.
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_features, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, in_features] -> [B]."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | Path, reward: str = "aesthetic") -> AestheticHead:
    """The aesthetic MLP with the weights of ``path`` (.safetensors, or .pth read with weights_only=True), eval mode.

    Raises:
        ValueError: a missing file, or weights whose keys/shapes are not the head's.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"reward {reward!r}: head={str(path)!r} is not a file")
    state = load_state_dict(reward, "head", path)
    if "layers.0.weight" not in state:
        raise ValueError(f"reward {reward!r}: head={str(path)!r} has keys {sorted(state)[:6]}..., not the "
                         "improved-aesthetic-predictor's (layers.0.weight, ..., layers.7.bias)")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"reward {reward!r}: head={str(path)!r} does not fit the 768-1024-128-64-16-1 MLP: "
                         f"{error}") from None
    return head.eval().requires_grad_(False)


class Aesthetic(TorchReward):
    """LAION improved-aesthetic-predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (about 1-10).

    As flow_grpo's AestheticScorer: CLIPModel + CLIPProcessor ``openai/clip-vit-large-patch14`` (PIL bicubic resize,
    centre crop 224, CLIP mean/std), get_image_features divided by its L2 norm, into the MLP
    768-1024-128-64-16-1 (AestheticHead) with the weights ``sac+logos+ava1-l14-linearMSE.pth``; the prompt is not
    used. flow_grpo ships that file in its assets; it comes from github.com/christophschuhmann/improved-aesthetic-
    predictor. Needs the pip extra ``clip`` (transformers).

    Args:
        head: path of the MLP weights (.pth, read with torch.load(weights_only=True), or .safetensors); required.
        model: hub id or local folder of the CLIPModel weights.
        processor: hub id or local folder of the CLIPProcessor; None: the ``model`` one (as flow_grpo).
        device: where to score; ``to(device)`` moves it later.
        dtype: "float32" (flow_grpo's), "float16" or "bfloat16" for the CLIP model (the head runs in float32).
        batch_size: images per forward pass.
    """

    def __init__(self, head: str | None = None, model: str = CLIP_L14, processor: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16):
        if not head:
            raise ValueError(f"reward 'aesthetic' needs head=<path to {AESTHETIC_HEAD_FILE}> (the MLP weights; from "
                             "github.com/christophschuhmann/improved-aesthetic-predictor or flow_grpo's "
                             "flow_grpo/assets), or a .safetensors conversion of it")
        transformers = require("transformers", "clip", "aesthetic")
        self.dtype = parse_dtype("aesthetic", dtype)
        self.batch_size = _check_batch_size("aesthetic", batch_size)
        self.head = load_aesthetic_head(head)
        self.processor = load_pretrained("aesthetic", "processor" if processor else "model", processor or model,
                                         _clip_processor_loader(transformers, auto=False),
                                         "the processor files" if processor else "the weights and processor files")
        self.clip = load_pretrained("aesthetic", "model", model, transformers.CLIPModel.from_pretrained)
        self.clip.eval().requires_grad_(False).to(self.dtype)
        projection = int(self.clip.config.projection_dim)
        if projection != self.head.layers[0].in_features:
            raise ValueError(f"reward 'aesthetic': the head takes {self.head.layers[0].in_features}-d embeddings but "
                             f"model={model!r} makes {projection}-d ones (the LAION head is for CLIP ViT-L/14)")
        self.to(device)

    def torch_modules(self) -> list[torch.nn.Module]:
        """The CLIP model and the MLP head."""
        return [self.clip, self.head]

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 (CPU) of images (PIL list or uint8 [B, H, W, 3]); prompts are only counted."""
        count = _check_prompts("aesthetic", images, prompts)
        pil = to_pil_images(images)

        def score(part: slice) -> torch.Tensor:
            pixels = self.processor(images=pil[part], return_tensors="pt")["pixel_values"]
            embeds = _normalise(features(self.clip.get_image_features(pixel_values=pixels.to(self.device,
                                                                                              self.dtype))))
            return self.head(embeds.float())

        return _score_in_chunks(count, self.batch_size, score)


# ----------------------------------------------------------------------------------------------------- HPSv2.1


def open_clip_arch(arch: str, reward: str = "hps") -> str:
    """The open_clip model name for ``arch``: a built-in name (e.g. "ViT-H-14"), or a model config JSON file
    ({"embed_dim", "vision_cfg", "text_cfg"}), which is registered with open_clip.add_model_config under its stem."""
    open_clip = require("open_clip", "hps", reward)
    path = Path(arch).expanduser()
    if arch.endswith(".json"):
        if not path.is_file():
            raise ValueError(f"reward {reward!r}: arch={arch!r}: no such model config file")
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"reward {reward!r}: arch={arch!r} is neither an open_clip model name nor a .json config")
    return arch


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class HPSv21(TorchReward):
    """HPSv2.1 human preference score: cos(text, image) of open_clip ViT-H-14 with HPS_v2.1 weights (about 0.2-0.35).

    As the hpsv2 package's img_score (and flow_grpo's hpsv2_score, which copies it): open_clip ``ViT-H-14`` with the
    checkpoint ``HPS_v2.1_compressed.pt`` of the hub repo ``xswu/HPSv2`` (its ``state_dict``); images preprocessed by
    hpsv2's ``preprocess_val``, which its ``light_augmentation=True`` makes ResizeMaxSize: RGB -> [0, 1] tensor ->
    bicubic resize of the LONGER edge to 224 on the tensor (antialiased: torchvision's default since 0.17) -> zero
    padding to 224 x 224 (half each side, the odd pixel right/bottom) -> OpenAI CLIP mean/std, so nothing is cropped
    (hpsv2 skips the padding when the longer edge is already 224; here a non-square image is padded then too);
    prompts through open_clip's ViT-H-14 tokenizer (77 tokens); the score is the dot product of the L2-normalised
    image and text features (no logit scale). hpsv2 runs under CUDA autocast (float16 matmuls); here ``dtype``
    decides. The checkpoint is read with torch.load(weights_only=True) or from
    .safetensors. Needs the pip extra ``hps`` (open-clip-torch).

    Args:
        model: hub repo id, local folder holding ``checkpoint``, or the checkpoint file itself.
        checkpoint: the file name in the repo/folder (HPS_v2.1_compressed.pt; HPS_v2_compressed.pt is HPSv2.0).
        arch: open_clip model name, or a model config JSON file (for other sizes, e.g. a test's tiny model).
        device: where to score; ``to(device)`` moves it later.
        dtype: "float32", "float16" or "bfloat16".
        batch_size: images per forward pass.
    """

    def __init__(self, model: str = HPS_REPO, checkpoint: str = HPS_V21_FILE, arch: str = HPS_ARCH,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16):
        open_clip = require("open_clip", "hps", "hps")
        self.dtype = parse_dtype("hps", dtype)
        self.batch_size = _check_batch_size("hps", batch_size)
        name = open_clip_arch(arch)
        path = resolve_file("hps", "model", model, checkpoint)
        quiet = _DropMessage("initialized randomly")  # open_clip's warning; the checkpoint is loaded next
        logging.getLogger().addFilter(quiet)
        try:
            self.model = open_clip.create_model(name, pretrained=None, device="cpu", output_dict=True)
        finally:
            logging.getLogger().removeFilter(quiet)
        state = load_state_dict("hps", "model", path)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"reward 'hps': {path} does not fit arch={arch!r}: {str(error)[:500]}") from None
        self.model.eval().requires_grad_(False).to(self.dtype)
        self.tokenizer = open_clip.get_tokenizer(name)
        image_size = self.model.visual.image_size
        side = image_size if isinstance(image_size, int) else int(image_size[0])
        self.side = side
        self.mean = tuple(getattr(self.model.visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(self.model.visual, "image_std", None) or OPENAI_STD)
        self.to(device)

    def torch_modules(self) -> list[torch.nn.Module]:
        """The open_clip model."""
        return [self.model]

    def pixels(self, images: Any) -> torch.Tensor:
        """hpsv2's preprocess_val: float32 pixels [B, 3, 224, 224] of images (PIL list or uint8 [B, H, W, 3])."""
        padded = [resize_longest_and_pad(image_to_unit_tensor(image), self.side) for image in to_pil_images(images)]
        return transform_unit_images(padded, resize=None, crop=None, mean=self.mean, std=self.std, mode="bicubic")

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 (CPU) of images (PIL list or uint8 [B, H, W, 3]) against their prompts [B]."""
        count = _check_prompts("hps", images, prompts)
        pil = to_pil_images(images)

        def score(part: slice) -> torch.Tensor:
            pixels = self.pixels(pil[part]).to(self.device, self.dtype)
            tokens = self.tokenizer(list(prompts[part])).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
            return (image_features * text_features).sum(-1)

        return _score_in_chunks(count, self.batch_size, score)


# ----------------------------------------------------------------------------------------------------- ImageReward


IMAGEREWARD_ENVIRONMENT_NOTE = (
    "image-reward 1.5 pins timm==0.6.13 (open_clip needs timm>=1), needs fairscale and openai-clip, and its BLIP "
    "code imports helpers that transformers 5 removed: give it its own environment (transformers<5), e.g. "
    "pip install image-reward timm==0.6.13 fairscale openai-clip 'transformers<5', and serve it to training with "
    "'sfgrpo reward-server --reward imagereward'")


def import_imagereward() -> Any:
    """The ``ImageReward.ImageReward`` module of the image-reward package, or MissingExtraError (extra
    ``imagereward``) explaining that it belongs in its own environment behind the reward server."""
    try:
        require("ImageReward", "imagereward", "imagereward")
    except MissingExtraError as error:
        raise MissingExtraError(f"{error}. {IMAGEREWARD_ENVIRONMENT_NOTE}") from None
    return importlib.import_module("ImageReward.ImageReward")


class ImageRewardScore(TorchReward):
    """ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP), the model's own normalised score (about -2..2).

    As flow_grpo's ImageRewardScorer, which calls ``ImageReward.load("ImageReward-v1.0")`` and
    ``inference_rank(prompt, [image])`` per image: the image-reward package's ``ImageReward`` class built from the hub
    repo ``THUDM/ImageReward``'s ``med_config.json`` with the weights ``ImageReward.pt`` (read here with
    torch.load(weights_only=True) instead of the package's plain torch.load); the package's own preprocess (PIL
    bicubic resize 224, centre crop, CLIP mean/std) and BERT tokenizer (padded to 35 tokens); score =
    (mlp(text_encoder(prompt, image)[CLS]) - 0.16717) / 1.03334, the package's mean/std, batched. The package
    downloads the tokenizer ``bert-base-uncased`` itself. Needs the pip extra ``imagereward``, which conflicts with
    the ``hps`` extra (timm) and transformers 5: run it behind ``sfgrpo reward-server`` in its own environment.

    Args:
        model: hub repo id (or "ImageReward-v1.0"), local folder holding ``checkpoint`` and ``med_config``, or the
            checkpoint file itself (then ``med_config`` must be a path or is looked up next to it).
        checkpoint: the weights' file name in the repo/folder.
        med_config: the BLIP text encoder config's file name in the repo/folder, or a path.
        device: where to score; ``to(device)`` moves it later.
        dtype: "float32" (flow_grpo's), "float16" or "bfloat16" for the BLIP model (the MLP runs in float32).
        batch_size: images per forward pass.
    """

    def __init__(self, model: str = IMAGEREWARD_REPO, checkpoint: str = IMAGEREWARD_FILE,
                 med_config: str = IMAGEREWARD_MED_CONFIG, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 16):
        package = import_imagereward()
        self.dtype = parse_dtype("imagereward", dtype)
        self.batch_size = _check_batch_size("imagereward", batch_size)
        if model == "ImageReward-v1.0":
            model = IMAGEREWARD_REPO
        weights = resolve_file("imagereward", "model", model, checkpoint)
        local = _local_path(model)
        if Path(med_config).expanduser().is_file():
            config = Path(med_config).expanduser()
        elif local is not None and local.is_file():  # the checkpoint file itself: its config lies beside it
            config = resolve_file("imagereward", "model", str(local.parent), med_config)
        else:
            config = resolve_file("imagereward", "model", model, med_config)
        try:
            self.model = package.ImageReward(med_config=str(config), device="cpu")
        except OSError as error:  # its BertTokenizer.from_pretrained('bert-base-uncased') could not be loaded
            raise ValueError(
                "reward 'imagereward': the image-reward package loads the tokenizer 'bert-base-uncased' from the "
                f"Hugging Face hub by name, and it is neither in the hub cache nor reachable ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}). Fix: download it into the hub "
                "cache once while online (`hf download bert-base-uncased`), or set HF_HOME to a cache that has it"
            ) from None
        state = load_state_dict("imagereward", "model", weights)
        missing, unexpected = self.model.load_state_dict(state, strict=False)  # as ImageReward.load
        used = [key for key in missing if key.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp."))
                and not key.endswith("position_ids")]
        if used:
            raise ValueError(f"reward 'imagereward': {weights} lacks {len(used)} weights the score uses, e.g. "
                             f"{used[:4]}: not an ImageReward checkpoint for {config.name}")
        if missing or unexpected:
            log.info("imagereward: %d unused keys missing, %d unexpected keys in %s", len(missing), len(unexpected),
                     weights)
        self.model.eval().requires_grad_(False)
        self.model.blip.to(self.dtype)
        self.to(device)

    def torch_modules(self) -> list[torch.nn.Module]:
        """The ImageReward model (BLIP + MLP)."""
        return [self.model]

    def to(self, device: str | torch.device) -> ImageRewardScore:
        """Move the model to ``device``, and tell the package's model (its methods read ``model.device``)."""
        super().to(device)
        self.model.device = self.device
        return self

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 (CPU) of images (PIL list or uint8 [B, H, W, 3]) against their prompts [B]."""
        count = _check_prompts("imagereward", images, prompts)
        pil = to_pil_images(images)
        model = self.model

        def score(part: slice) -> torch.Tensor:
            text = model.blip.tokenizer(list(prompts[part]), padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt").to(self.device)
            pixels = torch.stack([model.preprocess(image) for image in pil[part]]).to(self.device, self.dtype)
            image_embeds = model.blip.visual_encoder(pixels)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            output = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                             return_dict=True)
            cls = output.last_hidden_state[:, 0, :].float()
            rewards = (model.mlp(cls.to(next(model.mlp.parameters()).dtype)).squeeze(-1) - model.mean) / model.std
            return rewards

        return _score_in_chunks(count, self.batch_size, score)


register("pickscore", PickScore, replace=False)
register("clip", ClipScore, replace=False)
register("aesthetic", Aesthetic, replace=False)
register("hps", HPSv21, replace=False)
register("imagereward", ImageRewardScore, replace=False)
