"""mini_pickscore: a PickScore of the mini world, a small CLIP-style dual encoder trained on its scenes.

PickScore is a CLIP fine-tuned on human preferences; its score is logit_scale.exp() * cos(text_emb, image_emb)
(flow_grpo divides it by 26). This is the same thing in miniature, so that the mini world has a smooth, learned and
imperfect reward next to the pass/fail MiniGenEval:

* image encoder: 64x64 RGB in [0, 1] -> four 3x3/4x4 convolutions with GELU (64 -> 32 -> 16 -> 8 -> 8 pixels) ->
  the 8x8 feature map flattened (so positions survive) -> a linear projection -> L2-normalised [embed_dim];
* text encoder: its own word embedding + positions + a small pre-norm transformer over ``text.tokenize`` tokens,
  mean-pooled over the words -> LayerNorm -> linear projection -> L2-normalised [embed_dim];
* score = logit_scale.exp() * cosine, logit_scale learned (CLIP's init log(1 / 0.07), clamped at log(100)).

Training (build_pickscore, seeded):
a. contrastive: InfoNCE in both directions on freshly rendered train-split scenes, each image against every caption
   of the batch plus hard negatives (its own caption with one colour, shape, count or relation changed,
   perturb_spec); a caption that holds for an image (spec_holds, e.g. "a circle" for a red circle) is a positive;
b. preference (PickScore's objective): softmax over the two scores of a pair of images for one prompt against the
   preference, the pairs ordered by MiniGenEval (ties skipped): the base model's samples of train prompts, and
   rendered true scenes against perturbed copies (perturb_image: recoloured, moved, removed or added object, noise,
   blur), with the contrastive loss kept on at a lower weight.

Scale of the committed weights (learned logit_scale.exp() = 34.1, so one unit is 0.03 of cosine; the manifest's
"quality.retrieval_heldout.scores", 600 held-out scenes, mean and 10-90 % range): a true caption scores about 16.5
(7 to 24), its hard negatives about 10 (2 to 18), other scenes' captions about 2.4 (-10 to 13.5). As PickScore, it is
a ranking of captions and images, not a probability; divide by 26 as flow_grpo does if a 0-1-ish range is wanted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from ..atomic import atomic_save_safetensors, atomic_write_text
from ..rewards import TorchReward
from .geneval import MIN_RELATION_OFFSET, MiniGenEval, as_rgb64
from .scenes import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    PlacedObject,
    PromptSpec,
    Scene,
    Split,
    all_specs,
    caption,
    draw,
    is_heldout,
    parse_caption,
    sample_scene,
    split_specs,
)
from .text import MAX_TOKENS, tokenize, vocabulary

REWARD_WEIGHTS_DIR = Path(__file__).resolve().parent / "reward_weights"
WEIGHTS_FILE = "mini_pickscore.safetensors"
MANIFEST_FILE = "mini_pickscore_manifest.json"
FORMAT = "mini-pickscore"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of logit_scale
CAPTION_PERTURBATIONS = ("color", "shape", "count", "relation")
IMAGE_PERTURBATIONS = ("recolor", "move", "remove", "add", "noise", "blur")
_TRAIN_SEED_BASE = 3 * 10**8  # scene seeds of the training stages (seed * 10**6 added)
_EVAL_SEED_BASE = 2 * 10**9  # held-out scene seeds of the evaluation


# ----------------------------------------------------------------------------------------------------- the model


class ImageEncoder(nn.Module):
    """pixels [B, 3, 64, 64] float in [0, 1] -> unnormalised embeddings [B, embed_dim]."""

    def __init__(self, widths: Sequence[int] = (32, 64, 96, 64), embed_dim: int = 128):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"image_widths must have 4 entries, got {list(widths)}")
        w0, w1, w2, w3 = widths
        self.convs = nn.Sequential(
            nn.Conv2d(3, w0, 4, stride=2, padding=1), nn.GELU(),  # 32 x 32
            nn.Conv2d(w0, w1, 3, stride=2, padding=1), nn.GELU(),  # 16 x 16
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.GELU(),  # 8 x 8
            nn.Conv2d(w2, w3, 3, stride=1, padding=1), nn.GELU(),  # 8 x 8
        )
        self.norm = nn.LayerNorm(w3 * (IMAGE_SIZE // 8) ** 2)
        self.projection = nn.Linear(w3 * (IMAGE_SIZE // 8) ** 2, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.convs(pixels * 2.0 - 1.0).flatten(1)
        return self.projection(self.norm(features))


class CaptionEncoder(nn.Module):
    """tokens [B, MAX_TOKENS] (text.tokenize, 0 = padding) -> unnormalised embeddings [B, embed_dim]."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, embed_dim: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(len(vocabulary()), width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(MAX_TOKENS, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padding = tokens == 0
        attend_mask = padding.clone()
        attend_mask[padding.all(dim=1), 0] = False  # an empty prompt attends to its first slot (finite, meaningless)
        hidden = self.encoder(self.embedding(tokens) + self.position, src_key_padding_mask=attend_mask)
        keep = (~padding).unsqueeze(-1).float()
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.projection(self.norm(pooled))


class MiniPickScore(nn.Module):
    """The dual encoder; ``forward(pixels, tokens)`` -> scores [B] = logit_scale.exp() * cosine (see the module
    docstring for their range). ``config`` holds the constructor's arguments (stored in the safetensors metadata)."""

    def __init__(self, embed_dim: int = 128, image_widths: Sequence[int] = (32, 64, 96, 64), text_width: int = 64,
                 text_layers: int = 2, text_heads: int = 4):
        super().__init__()
        self.config = {"embed_dim": embed_dim, "image_widths": list(image_widths), "text_width": text_width,
                       "text_layers": text_layers, "text_heads": text_heads}
        self.image = ImageEncoder(image_widths, embed_dim)
        self.text = CaptionEncoder(text_width, text_layers, text_heads, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> torch.Tensor:
        """logit_scale.exp(), clamped at 100 as CLIP's."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 64, 64] in [0, 1] -> L2-normalised [B, embed_dim]."""
        return F.normalize(self.image(pixels), dim=-1)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, MAX_TOKENS] tokens -> L2-normalised [B, embed_dim]."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.scale() * (self.encode_images(pixels) * self.encode_texts(tokens)).sum(-1)


def pixels_from(images: Any) -> torch.Tensor:
    """float [B, 3, 64, 64] in [0, 1] from a uint8 [B, H, W, 3] array / tensor or a list of PIL images / [H, W, 3]
    uint8 arrays (other sizes resized bilinearly to 64, as MiniGenEval does). Raises ValueError on anything else."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) \
            and images.dtype == np.uint8:
        array = images
    else:
        rows = []
        for index, image in enumerate(images):
            row = as_rgb64(image)
            if row is None:
                raise ValueError(f"mini_pickscore: image {index} is not a PIL image or an [H, W, 3] uint8 array")
            rows.append(row)
        array = np.stack(rows) if rows else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def save_pickscore(model: MiniPickScore, path: str | Path, half_precision: bool = True) -> None:
    """Write the model atomically as safetensors (fp16 when half_precision), its config in the metadata."""
    state = {k: v.half() if half_precision and v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, path, {"format": FORMAT, "config": json.dumps(model.config)})


def load_pickscore(path: str | Path) -> MiniPickScore:
    """A MiniPickScore from a file save_pickscore wrote: float32, frozen, train(False)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{str(path)!r} is not a mini_pickscore file (metadata format {metadata.get('format')!r})")
    model = MiniPickScore(**json.loads(metadata["config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.train(False).requires_grad_(False)


class MiniPickScoreReward(TorchReward):
    """The registered reward: reward(images, prompts, metadata=None) -> float32 [B] = logit_scale.exp() * cosine.

    images: uint8 [B, H, W, 3] array / tensor or a list of PIL images (resized to 64). prompts: mini-world captions
    (an unknown word raises ValueError naming it). Caption embeddings are cached per prompt.
    """

    def __init__(self, model: MiniPickScore):
        self.model = model
        self._text_cache: dict[str, torch.Tensor] = {}

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def to(self, device: str | torch.device) -> MiniPickScoreReward:
        self._text_cache.clear()
        super().to(device)
        return self

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, embed_dim] normalised caption embeddings, cached per prompt."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            embeddings = self.model.encode_texts(tokenize(missing).to(self.device))
            if len(self._text_cache) + len(missing) > 4096:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, embeddings, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        pixels = pixels_from(images)
        if len(pixels) != len(prompts):
            raise ValueError(f"mini_pickscore: got {len(pixels)} images and {len(prompts)} prompts")
        if not len(prompts):
            return torch.zeros(0)
        image_embeddings = self.model.encode_images(pixels.to(self.device))
        cosine = (image_embeddings * self.text_embeddings(prompts)).sum(-1)
        return (self.model.scale() * cosine).float().cpu()


def load_reward(path: str | Path = "") -> MiniPickScoreReward:
    """The reward from ``path`` (a file build_pickscore wrote) or, when empty, the committed weights.

    Raises ValueError naming ``path`` when the file is missing or not a mini_pickscore file.
    """
    if not isinstance(path, str | Path):
        raise ValueError(f"mini_pickscore option 'path' must be a string (a .safetensors file), got {path!r}")
    file = Path(path) if str(path) else REWARD_WEIGHTS_DIR / WEIGHTS_FILE
    if not file.is_file():
        raise ValueError(f"mini_pickscore option 'path': no file at {str(file)!r}; build one with `sfgrpo miniworld "
                         "build --pickscore --out DIR` (DIR/mini_pickscore.safetensors), or leave 'path' empty for "
                         "the committed weights")
    try:
        model = load_pickscore(file)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"mini_pickscore option 'path': cannot load {str(file)!r}: {error}") from error
    return MiniPickScoreReward(model)


# --------------------------------------------------------------------------------- captions: truth and negatives


def _matches(placed: PlacedObject, obj: ObjectSpec) -> bool:
    return placed.shape == obj.shape and (obj.color is None or placed.color == obj.color)


def spec_holds(spec: PromptSpec, objects: Sequence[PlacedObject]) -> bool:
    """Whether a caption's spec is true of a scene's drawn objects (MiniGenEval's constraints, judged on the
    objects themselves): named objects present; counting exactly ``count``; position a pair whose centres are at
    least MIN_RELATION_OFFSET pixels apart in the named direction."""
    if spec.category == "counting":
        return sum(_matches(o, spec.objects[0]) for o in objects) == spec.required_count()
    if spec.category == "position":
        first, second = spec.objects
        relation = spec.relation
        if relation is None:
            raise ValueError(f"a position spec needs a relation: {spec!r}")
        return any(_offset(a, relation, b) >= MIN_RELATION_OFFSET for a in objects for b in objects
                   if a is not b and _matches(a, first) and _matches(b, second))
    return all(any(_matches(o, obj) for o in objects) for obj in spec.objects)


def _offset(first: PlacedObject, relation: str, second: PlacedObject) -> float:
    """Pixels first's centre lies from second's in the relation's direction (geneval.relation_offset)."""
    return {"left of": second.x - first.x, "right of": first.x - second.x, "above": second.y - first.y,
            "below": first.y - second.y}[relation]


def applicable_perturbations(spec: PromptSpec) -> tuple[str, ...]:
    """The CAPTION_PERTURBATIONS that can change this spec (colour needs a coloured object, count a counting spec,
    relation a position spec)."""
    kinds = ["shape"]
    if spec.objects[0].color is not None:
        kinds.insert(0, "color")
    if spec.category == "counting":
        kinds.append("count")
    if spec.category == "position":
        kinds.append("relation")
    return tuple(kinds)


def perturb_spec(spec: PromptSpec, kind: str, rng: np.random.Generator) -> PromptSpec | None:
    """The spec with one thing changed, a hard negative of its caption; None when the change is not possible or
    gives no valid composition of the category (scenes.all_specs).

    kind: "color" (one object's colour replaced, or, with two coloured objects, half the time their colours
    swapped), "shape" (one object's shape replaced), "count" (another count 1-4), "relation" (another relation,
    or a third of the time the two objects swapped).
    """
    if kind not in CAPTION_PERTURBATIONS:
        raise ValueError(f"unknown caption perturbation {kind!r}; expected one of {CAPTION_PERTURBATIONS}")
    objects = list(spec.objects)
    index = int(rng.integers(len(objects)))
    if kind == "color":
        if objects[index].color is None:
            return None
        if len(objects) == 2 and objects[0].color != objects[1].color and rng.random() < 0.5:
            objects = [ObjectSpec(objects[0].shape, objects[1].color), ObjectSpec(objects[1].shape, objects[0].color)]
        else:
            others = [c for c in COLORS if c != objects[index].color]
            objects[index] = ObjectSpec(objects[index].shape, others[rng.integers(len(others))])
        changed = replace(spec, objects=tuple(objects))
    elif kind == "shape":
        others = [s for s in SHAPES if s != objects[index].shape]
        objects[index] = ObjectSpec(others[rng.integers(len(others))], objects[index].color)
        changed = replace(spec, objects=tuple(objects))
    elif kind == "count":
        if spec.category != "counting":
            return None
        counts = [n for n in range(1, len(NUMBER_WORDS) + 1) if n != spec.count]
        changed = replace(spec, count=counts[rng.integers(len(counts))])
    else:
        if spec.category != "position":
            return None
        if rng.random() < 1 / 3:
            changed = replace(spec, objects=(objects[1], objects[0]))
        else:
            others = [r for r in RELATIONS if r != spec.relation]
            changed = replace(spec, relation=others[rng.integers(len(others))])
    return changed if changed != spec and changed in _valid_specs(spec.category) else None


def perturb_caption(text: str, kind: str, rng: np.random.Generator) -> str | None:
    """perturb_spec on a caption's text: the caption with one colour, shape, count or relation changed, or None."""
    changed = perturb_spec(parse_caption(text), kind, rng)
    return None if changed is None else caption(changed)


def hard_negatives(spec: PromptSpec, objects: Sequence[PlacedObject], count: int, rng: np.random.Generator,
                   split: Split | None = None, tries: int = 20) -> list[PromptSpec]:
    """Up to ``count`` distinct perturb_spec changes of spec (kinds in turn from a random start) that are false of
    the scene's objects and, with a split, belong to it."""
    kinds = applicable_perturbations(spec)
    start = int(rng.integers(len(kinds)))
    found: list[PromptSpec] = []
    for attempt in range(tries):
        if len(found) == count:
            break
        changed = perturb_spec(spec, kinds[(start + attempt) % len(kinds)], rng)
        if changed is None or changed in found or spec_holds(changed, objects):
            continue
        if split is not None and is_heldout(changed) != (split == "heldout"):
            continue
        found.append(changed)
    return found


_VALID: dict[str, frozenset[PromptSpec]] = {}


def _valid_specs(category: str) -> frozenset[PromptSpec]:
    if category not in _VALID:
        _VALID[category] = frozenset(all_specs(category))
    return _VALID[category]


# ------------------------------------------------------------------------------------- images: perturbed scenes


def perturb_image(scene: Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A [64, 64, 3] uint8 copy of the scene's image with one thing spoilt.

    kind: "recolor" (one object another palette colour), "move" (one object to a random place), "remove" (one object
    dropped; kept when it is the only one), "add" (one more object of a random kind, which may overlap), "noise"
    (Gaussian pixel noise, std 8-60 in 0-255 units), "blur" (Gaussian blur, radius 0.5-2.5 pixels).
    """
    objects = list(scene.objects)
    index = int(rng.integers(len(objects)))
    target = objects[index]
    if kind == "recolor":
        others = [c for c in COLORS if c != target.color]
        objects[index] = replace(target, color=others[rng.integers(len(others))])
    elif kind == "move":
        x, y = (float(v) for v in rng.uniform(target.size + 1, IMAGE_SIZE - target.size - 1, size=2))
        objects[index] = replace(target, x=x, y=y)
    elif kind == "remove":
        if len(objects) > 1:
            objects.pop(index)
    elif kind == "add":
        size = float(rng.uniform(6.0, 10.0))
        x, y = (float(v) for v in rng.uniform(size + 1, IMAGE_SIZE - size - 1, size=2))
        objects.append(PlacedObject(SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))], x, y, size))
    elif kind == "noise":
        noisy = scene.image.astype(np.float32) + rng.normal(0.0, rng.uniform(8.0, 60.0), scene.image.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    elif kind == "blur":
        blurred = Image.fromarray(scene.image).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
        return np.asarray(blurred).copy()
    else:
        raise ValueError(f"unknown image perturbation {kind!r}; expected one of {IMAGE_PERTURBATIONS}")
    return draw(tuple(objects))


# ---------------------------------------------------------------------------------------------- build settings


@dataclass(frozen=True)
class PickScoreSettings:
    """Settings of build_pickscore; the defaults build the committed weights (~19 min on one thread), QUICK
    builds a throwaway reward in seconds (tests)."""

    seed: int = 0
    # the model
    embed_dim: int = 128
    image_widths: tuple[int, ...] = (32, 64, 96, 64)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # stage a: contrastive on rendered train-split scenes
    contrastive_steps: int = 1200
    contrastive_batch: int = 128  # scenes per step
    hard_negatives: int = 2  # perturbed captions per scene, extra columns of the image -> text InfoNCE
    contrastive_lr: float = 2e-3  # AdamW peak (one-cycle)
    weight_decay: float = 0.01
    # stage b: preference pairs
    generated_prompts: int = 120  # train prompts (category-balanced) sampled by the base mini world; 0: none
    generated_per_prompt: int = 8  # images per prompt, split evenly between generation_guidances
    generation_guidances: tuple[float, ...] = (1.0, 4.0)  # classifier-free guidance of the base samples
    generation_steps: int = 10  # ODE steps of the base samples
    perturbed_scenes: int = 6000  # rendered train scenes, each paired with one perturb_image copy
    preference_steps: int = 400
    preference_batch: int = 64  # pairs per step, half generated and half perturbed (when there are both)
    preference_lr: float = 5e-4
    contrastive_weight: float = 0.5  # weight of the contrastive loss during stage b (its batch: contrastive_batch/2)
    # evaluation on held-out data
    eval_scenes: int = 600  # held-out rendered scenes for retrieval
    eval_other_captions: int = 7  # other scenes' captions per scene in the retrieval against other captions
    eval_prompts_per_category: int = 8  # held-out prompts sampled by the base model for agreement with MiniGenEval
    eval_images_per_prompt: int = 8
    half_precision: bool = True  # store fp16 (evaluated as stored)

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            values = value if isinstance(value, tuple) else (value,)
            for item in values:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ValueError(f"PickScoreSettings.{spec.name} must be finite, got {value!r}")
        positive = ("embed_dim", "text_width", "text_layers", "text_heads", "contrastive_batch", "generation_steps",
                    "preference_batch", "eval_scenes", "eval_other_captions", "generated_per_prompt",
                    "eval_images_per_prompt")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PickScoreSettings.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("contrastive_steps", "hard_negatives", "generated_prompts", "perturbed_scenes",
                     "preference_steps", "eval_prompts_per_category"):
            if getattr(self, name) < 0:
                raise ValueError(f"PickScoreSettings.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("contrastive_lr", "preference_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PickScoreSettings.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "contrastive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"PickScoreSettings.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.generation_guidances or any(g <= 0 for g in self.generation_guidances):
            raise ValueError(f"PickScoreSettings.generation_guidances must be positive, got "
                             f"{self.generation_guidances!r}")
        if self.text_width % self.text_heads:
            raise ValueError(f"PickScoreSettings.text_width ({self.text_width}) must be a multiple of text_heads "
                             f"({self.text_heads})")
        if len(self.image_widths) != 4 or min(self.image_widths) < 1:
            raise ValueError(f"PickScoreSettings.image_widths must be 4 positive widths, got {self.image_widths!r}")


QUICK = PickScoreSettings(contrastive_steps=8, contrastive_batch=24, generated_prompts=2, generated_per_prompt=2,
                          perturbed_scenes=48, preference_steps=6, preference_batch=12, eval_scenes=24,
                          eval_other_captions=3, eval_prompts_per_category=1, eval_images_per_prompt=2)


def make_model(settings: PickScoreSettings) -> MiniPickScore:
    """A freshly initialised MiniPickScore of the settings' shape, seeded by settings.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return MiniPickScore(settings.embed_dim, settings.image_widths, settings.text_width, settings.text_layers,
                             settings.text_heads)


# ------------------------------------------------------------------------------------------------ stage a: InfoNCE


def scene_for(seed: int, split: Split) -> Scene:
    """The scene of a seed, categories cycling with the seed (as autoencoder.scene_batch)."""
    return sample_scene(seed, CATEGORIES[seed % len(CATEGORIES)], split=split)


def images_of(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 [B, 64, 64, 3] images of the scenes."""
    return np.stack([scene.image for scene in scenes])


@dataclass(frozen=True)
class ContrastiveBatch:
    pixels: torch.Tensor  # [B, 3, 64, 64] in [0, 1]
    tokens: torch.Tensor  # [T, MAX_TOKENS]: the B true captions, then the hard negatives
    positives: torch.Tensor  # [B, T] bool: caption t holds for image b (true captions on the diagonal)


def contrastive_batch(seeds: Sequence[int], negatives: int, rng: np.random.Generator,
                      split: Split = "train") -> ContrastiveBatch:
    """The rendered scenes of the seeds with their captions and ``negatives`` hard negatives each (from the split),
    and which caption holds for which image (spec_holds)."""
    scenes = [scene_for(seed, split) for seed in seeds]
    specs = [scene.spec for scene in scenes]
    for scene in scenes:
        specs += hard_negatives(scene.spec, scene.objects, negatives, rng, split=split)
    unique = list(dict.fromkeys(specs))
    holds = np.array([[spec_holds(spec, scene.objects) for spec in unique] for scene in scenes])
    column = {spec: i for i, spec in enumerate(unique)}
    positives = torch.from_numpy(holds[:, [column[spec] for spec in specs]])
    return ContrastiveBatch(pixels_from(images_of(scenes)), tokenize([caption(s) for s in specs]), positives)


def contrastive_loss(model: MiniPickScore, batch: ContrastiveBatch) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: image -> every caption of the batch (the log of the softmax mass on
    the captions that hold), and each true caption -> the batch's images (mass on the images it holds for)."""
    images = model.encode_images(batch.pixels)
    texts = model.encode_texts(batch.tokens)
    logits = model.scale() * images @ texts.T  # [B, T]
    count = images.shape[0]
    masked = logits.masked_fill(~batch.positives, float("-inf"))
    image_to_text = torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)
    columns, positives = logits[:, :count].T, batch.positives[:, :count].T  # [B captions, B images]
    text_to_image = torch.logsumexp(columns, 1) - torch.logsumexp(columns.masked_fill(~positives, float("-inf")), 1)
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


# --------------------------------------------------------------------------------------- stage b: preference pairs


@dataclass(frozen=True)
class PreferencePairs:
    preferred: np.ndarray  # uint8 [N, 64, 64, 3]
    other: np.ndarray  # uint8 [N, 64, 64, 3], scored lower by MiniGenEval for the same prompt
    prompts: list[str]  # N captions


def _empty_pairs() -> PreferencePairs:
    empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return PreferencePairs(empty, empty.copy(), [])


def ordered_pairs(images: np.ndarray, scores: Sequence[float], groups: Sequence[int],
                  prompts: Sequence[str]) -> PreferencePairs:
    """Every pair of images of one group (same prompt) whose scores differ, the higher first; ties and NaN skipped.

    images: uint8 [N, 64, 64, 3]; scores, groups: [N]; prompts: each group's caption (image i's is
    prompts[groups[i]]).
    """
    first, second = [], []
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            if groups[a] != groups[b] or not (math.isfinite(scores[a]) and math.isfinite(scores[b])):
                continue
            if scores[a] != scores[b]:
                first.append(a if scores[a] > scores[b] else b)
                second.append(b if scores[a] > scores[b] else a)
    if not first:
        return _empty_pairs()
    return PreferencePairs(images[first], images[second], [prompts[groups[i]] for i in first])


def balanced_prompts(split: Split, per_category: int, rng: np.random.Generator) -> list[str]:
    """``per_category`` captions of each category of the split, drawn with replacement only when too few."""
    prompts = []
    for category in CATEGORIES:
        pool = [caption(spec) for spec in split_specs(category, split)]
        prompts += [pool[i] for i in rng.choice(len(pool), per_category, replace=len(pool) < per_category)]
    return prompts


@torch.no_grad()
def generate(prompts: Sequence[str], per_prompt: int, guidances: Sequence[float], steps: int, seed: int,
             components: tuple[Any, Any, Any] | None = None) -> tuple[np.ndarray, list[int]]:
    """The base mini world's samples: uint8 [len(prompts) * per_prompt, 64, 64, 3] and each image's prompt index.

    per_prompt images per prompt, split evenly between the guidances (the first ones take the remainder); ODE
    sampling as build.evaluate.
    """
    from . import autoencoder, denoiser, world

    transformer, text_encoder, vae = components or world.load_components()
    scaling = float(vae.config.scaling_factor)
    images, groups = [], []
    for g_index, guidance in enumerate(guidances):
        copies = per_prompt // len(guidances) + int(g_index < per_prompt % len(guidances))
        indices = [p for p in range(len(prompts)) for _ in range(copies)]
        for start in range(0, len(indices), 64):
            chunk = indices[start : start + 64]
            latents = denoiser.sample(transformer, text_encoder, [prompts[p] for p in chunk],
                                      seed=seed * 1000 + g_index * 10**6 + start, steps=steps, guidance=guidance)
            images.append(autoencoder.to_uint8(vae.decoder(latents / scaling)).numpy())
            groups += chunk
    return np.concatenate(images), groups


def generated_pairs(settings: PickScoreSettings, components: tuple[Any, Any, Any] | None) -> PreferencePairs:
    """Pairs of the base model's samples of category-balanced train prompts, ordered by MiniGenEval."""
    per_category = math.ceil(settings.generated_prompts / len(CATEGORIES))
    if settings.generated_prompts == 0:
        return _empty_pairs()
    prompts = balanced_prompts("train", per_category, np.random.default_rng(settings.seed + 11))
    images, groups = generate(prompts, settings.generated_per_prompt, settings.generation_guidances,
                              settings.generation_steps, settings.seed + 1, components)
    scores = MiniGenEval()(images, [prompts[g] for g in groups]).tolist()
    return ordered_pairs(images, scores, groups, prompts)


def perturbed_pairs(settings: PickScoreSettings) -> PreferencePairs:
    """Rendered train scenes against one perturb_image copy each (kinds in turn), ordered by MiniGenEval."""
    rng = np.random.default_rng(settings.seed + 12)
    base = _TRAIN_SEED_BASE + settings.seed * 10**6 + 500_000
    scenes = [scene_for(base + i, "train") for i in range(settings.perturbed_scenes)]
    if not scenes:
        return _empty_pairs()
    spoilt = np.stack([perturb_image(s, IMAGE_PERTURBATIONS[i % len(IMAGE_PERTURBATIONS)], rng)
                       for i, s in enumerate(scenes)])
    originals = images_of(scenes)
    captions_ = [s.caption for s in scenes]
    judge = MiniGenEval()
    true_scores, spoilt_scores = judge(originals, captions_).tolist(), judge(spoilt, captions_).tolist()
    images = np.concatenate([originals, spoilt])
    return ordered_pairs(images, true_scores + spoilt_scores, list(range(len(scenes))) * 2, captions_)


def preference_loss(model: MiniPickScore, preferred: torch.Tensor, other: torch.Tensor,
                    tokens: torch.Tensor) -> torch.Tensor:
    """PickScore's objective: cross-entropy of softmax([s_preferred, s_other]) against the preference (the first).

    preferred, other: pixels [N, 3, 64, 64]; tokens [N, MAX_TOKENS] of the pairs' shared prompt."""
    texts = model.encode_texts(tokens)
    scale = model.scale()
    first = scale * (model.encode_images(preferred) * texts).sum(-1)
    second = scale * (model.encode_images(other) * texts).sum(-1)
    return F.softplus(second - first).mean()  # = -log softmax([first, second])[0]


# ---------------------------------------------------------------------------------------------------- training


def _optimizer(model: MiniPickScore, lr: float, steps: int, weight_decay: float):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    return optimizer, schedule


def _step(model: MiniPickScore, optimizer, schedule, loss: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    return float(loss.detach())


def train_contrastive(model: MiniPickScore, settings: PickScoreSettings,
                      progress: Callable[[int, float], None] | None = None) -> float:
    """Stage a, in place; returns the last loss (NaN for no steps)."""
    rng = np.random.default_rng(settings.seed + 21)
    optimizer, schedule = _optimizer(model, settings.contrastive_lr, settings.contrastive_steps,
                                     settings.weight_decay)
    base, loss = _TRAIN_SEED_BASE + settings.seed * 10**6, float("nan")
    model.train()
    for step in range(settings.contrastive_steps):
        seeds = range(base + step * settings.contrastive_batch, base + (step + 1) * settings.contrastive_batch)
        loss = _step(model, optimizer, schedule,
                     contrastive_loss(model, contrastive_batch(seeds, settings.hard_negatives, rng)))
        if progress is not None:
            progress(step, loss)
    return loss


def train_preference(model: MiniPickScore, pairs: Sequence[PreferencePairs], settings: PickScoreSettings,
                     progress: Callable[[int, float], None] | None = None) -> float:
    """Stage b, in place: each step a batch of pairs drawn evenly from the non-empty pair sets, plus the contrastive
    loss (weight contrastive_weight) on fresh train scenes. Returns the last preference loss."""
    sources = [p for p in pairs if len(p.prompts)]
    if not sources or settings.preference_steps == 0:
        return float("nan")
    rng = np.random.default_rng(settings.seed + 31)
    generator = torch.Generator().manual_seed(settings.seed + 32)
    optimizer, schedule = _optimizer(model, settings.preference_lr, settings.preference_steps,
                                     settings.weight_decay)
    per_source = max(1, settings.preference_batch // len(sources))
    half = max(2, settings.contrastive_batch // 2)
    base, value = _TRAIN_SEED_BASE + settings.seed * 10**6 + 900_000, float("nan")
    model.train()
    for step in range(settings.preference_steps):
        preferred, other, prompts = [], [], []
        for source in sources:
            index = torch.randint(len(source.prompts), (per_source,), generator=generator).numpy()
            preferred.append(source.preferred[index])
            other.append(source.other[index])
            prompts += [source.prompts[i] for i in index]
        pref = preference_loss(model, pixels_from(np.concatenate(preferred)), pixels_from(np.concatenate(other)),
                               tokenize(prompts))
        loss = pref
        if settings.contrastive_weight > 0:
            seeds = range(base + step * half, base + (step + 1) * half)
            batch = contrastive_batch(seeds, settings.hard_negatives, rng)
            loss = loss + settings.contrastive_weight * contrastive_loss(model, batch)
        _step(model, optimizer, schedule, loss)
        value = float(pref.detach())
        if progress is not None:
            progress(step, value)
    return value


# -------------------------------------------------------------------------------------------------- evaluation


def rank_average(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 0..N-1 of the values, ties sharing their average rank."""
    array = np.asarray(values, dtype=np.float64)
    unique, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2.0)[inverse]


def spearman(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or too short."""
    if len(first) < 2:
        return math.nan
    a, b = rank_average(first), rank_average(second)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return math.nan if denominator == 0 else float((a * b).sum() / denominator)


@torch.no_grad()
def score_pairs(model: MiniPickScore, images: np.ndarray, texts: Sequence[str], batch: int = 256) -> np.ndarray:
    """float64 [N] scores of image i with caption i (uint8 images [N, 64, 64, 3])."""
    reward = MiniPickScoreReward(model)
    out = [reward(images[i : i + batch], texts[i : i + batch]).numpy() for i in range(0, len(texts), batch)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def retrieval_quality(model: MiniPickScore, count: int, other_captions: int, seed: int = 0) -> dict[str, Any]:
    """Retrieval on ``count`` held-out rendered scenes: each image against (a) its true caption and its hard
    negatives (one per applicable kind, false of the scene), (b) its true caption and ``other_captions`` captions of
    other held-out scenes that are false of it. Accuracies are top-1 (ties count as misses); pairwise fractions
    compare the true caption with each candidate; "scores" gives the mean and 10-90% range of each group."""
    rng = np.random.default_rng(seed + 41)
    scenes = [scene_for(_EVAL_SEED_BASE + seed * 10**6 + i, "heldout") for i in range(count)]
    pool = [s.spec for s in scenes]
    images, texts, owners, roles = [], [], [], []
    for index, scene in enumerate(scenes):
        negatives = hard_negatives(scene.spec, scene.objects, len(CAPTION_PERTURBATIONS), rng)
        others: list[PromptSpec] = []
        for _ in range(20 * other_captions):
            if len(others) == other_captions:
                break
            candidate = pool[int(rng.integers(len(pool)))]
            if candidate not in others and not spec_holds(candidate, scene.objects):
                others.append(candidate)
        for role, specs in (("true", [scene.spec]), ("hard", negatives), ("other", others)):
            for spec in specs:
                images.append(scene.image)
                texts.append(caption(spec))
                owners.append(index)
                roles.append(role)
    scores = score_pairs(model, np.stack(images), texts)
    owner_array, role_array = np.array(owners), np.array(roles)
    true_score = np.full(count, np.nan)
    true_score[owner_array[role_array == "true"]] = scores[role_array == "true"]

    def summary(role: str) -> dict[str, Any]:
        chosen = role_array == role
        beaten = true_score[owner_array[chosen]] > scores[chosen]
        best = np.full(count, -np.inf)
        np.maximum.at(best, owner_array[chosen], scores[chosen])
        has = np.bincount(owner_array[chosen], minlength=count) > 0
        return {"top1_accuracy": float((true_score[has] > best[has]).mean()) if has.any() else math.nan,
                "pairwise_true_wins": float(beaten.mean()) if beaten.size else math.nan,
                "candidates_per_scene": float(chosen.sum() / max(int(has.sum()), 1)), "scenes": int(has.sum())}

    def spread(values: np.ndarray) -> dict[str, float]:
        return {"mean": round(float(values.mean()), 3), "p10": round(float(np.percentile(values, 10)), 3),
                "p90": round(float(np.percentile(values, 90)), 3)}

    return {"scenes": count, "true_vs_hard_negatives": summary("hard"), "true_vs_other_captions": summary("other"),
            "scores": {role: spread(scores[role_array == role]) for role in ("true", "hard", "other")}}


@torch.no_grad()
def agreement_quality(model: MiniPickScore, images: np.ndarray, groups: Sequence[int],
                      prompts: Sequence[str]) -> dict[str, Any]:
    """Agreement with MiniGenEval on generated images: Spearman within each prompt's images (mean over prompts whose
    two scores both vary), over all images, and the fraction of MiniGenEval-ordered pairs of a prompt (ties skipped)
    that the score orders the same way."""
    texts = [prompts[g] for g in groups]
    if not texts:
        return {"images": 0}
    gold = MiniGenEval()(images, texts).numpy().astype(np.float64)
    ours = score_pairs(model, images, texts)
    group_array = np.asarray(groups)
    within, agree, total = [], 0, 0
    for group in np.unique(group_array):
        members = np.flatnonzero(group_array == group)
        value = spearman(ours[members], gold[members])
        if not math.isnan(value):
            within.append(value)
        for a in members:
            for b in members:
                if gold[a] > gold[b]:
                    total += 1
                    agree += int(ours[a] > ours[b])
    return {"images": len(texts), "prompts": len(prompts),
            "spearman_within_prompt": float(np.mean(within)) if within else math.nan,
            "prompts_with_varied_scores": len(within), "spearman_overall": spearman(ours, gold),
            "pairwise_agreement": agree / total if total else math.nan, "ordered_pairs": total,
            "minigeneval_mean": float(np.nanmean(gold))}


def heldout_generations(settings: PickScoreSettings, components: tuple[Any, Any, Any] | None
                        ) -> tuple[np.ndarray, list[int], list[str]]:
    """The base model's samples of category-balanced held-out prompts (the agreement evaluation's images)."""
    if settings.eval_prompts_per_category == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), [], []
    rng = np.random.default_rng(settings.seed + 13)
    prompts = balanced_prompts("heldout", settings.eval_prompts_per_category, rng)
    images, groups = generate(prompts, settings.eval_images_per_prompt, settings.generation_guidances,
                              settings.generation_steps, settings.seed + 2, components)
    return images, groups, prompts


# ------------------------------------------------------------------------------------------------------- build


def build_pickscore(out_dir: str | Path = REWARD_WEIGHTS_DIR, settings: PickScoreSettings = PickScoreSettings(), *,
                    progress: bool = True) -> dict[str, Any]:
    """Train the reward (stage a, then b), evaluate it as stored, write WEIGHTS_FILE and MANIFEST_FILE into out_dir
    (atomically) and return the manifest.

    Runs on one thread whatever torch's setting: with several, the CPU backward passes (the text encoder's embedding
    gradient among them) accumulate in a varying order and two builds with the same seed would differ.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_pickscore(Path(out_dir), settings, progress)
    finally:
        torch.set_num_threads(threads)


def _build_pickscore(out_dir: Path, settings: PickScoreSettings, progress: bool) -> dict[str, Any]:
    from .build import _Bars, sha256

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    bars = _Bars(progress)
    model = make_model(settings)

    mark = time.perf_counter()
    bar = bars.new(settings.contrastive_steps, "pickscore contrastive")
    contrastive_final = train_contrastive(model, settings, lambda step, loss: bars.step(bar, loss))
    bars.close()
    seconds["contrastive"] = time.perf_counter() - mark

    mark = time.perf_counter()
    needs_world = settings.generated_prompts > 0 or settings.eval_prompts_per_category > 0
    components = None
    if needs_world:
        from . import world

        components = world.load_components()
    generated = generated_pairs(settings, components)
    perturbed = perturbed_pairs(settings)
    eval_images, eval_groups, eval_prompts = heldout_generations(settings, components)
    seconds["pairs_and_samples"] = time.perf_counter() - mark

    mark = time.perf_counter()
    bar = bars.new(settings.preference_steps, "pickscore preference")
    preference_final = train_preference(model, [generated, perturbed], settings,
                                        lambda step, loss: bars.step(bar, loss))
    bars.close()
    seconds["preference"] = time.perf_counter() - mark

    path = out_dir / WEIGHTS_FILE
    save_pickscore(model.train(False), path, settings.half_precision)
    stored = load_pickscore(path)  # measure what is committed
    mark = time.perf_counter()
    quality = {
        "retrieval_heldout": retrieval_quality(stored, settings.eval_scenes, settings.eval_other_captions,
                                               settings.seed),
        "minigeneval_agreement_heldout": agreement_quality(stored, eval_images, eval_groups, eval_prompts),
    }
    seconds["evaluation"] = time.perf_counter() - mark
    manifest = {
        "settings": asdict(settings),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "parameters": sum(p.numel() for p in stored.parameters()),
        "logit_scale_exp": round(float(stored.scale()), 4),
        "final_losses": {"contrastive": contrastive_final, "preference": preference_final},
        "preference_pairs": {"generated": len(generated.prompts), "perturbed": len(perturbed.prompts)},
        "quality": quality,
        "file": {"name": WEIGHTS_FILE, "sha256": sha256(path), "bytes": path.stat().st_size},
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(_finite(manifest), indent=2) + "\n")
    return manifest


def _finite(value: Any) -> Any:
    """The manifest with NaN / inf floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
