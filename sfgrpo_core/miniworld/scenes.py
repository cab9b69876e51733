"""Procedural mini-world scenes: flat coloured shapes on a dark background, captioned with GenEval-style templates.

Pixel convention: an image is [IMAGE_SIZE, IMAGE_SIZE, 3] RGB uint8 indexed [row y, column x]; pixel (y, x) covers
[x, x + 1) x [y, y + 1), so its centre is (x + 0.5, y + 0.5). Object centres and sizes are in pixels of that image;
an object's size is its half-extent (circle radius; triangle half-height and half-base; the square's half-side is
SQUARE_HALF_SIDE times it), so every object lies inside the box centre +- size.

Categories and templates (GenEval's six; as in GenEval, single_object and two_objects name no colour, which keeps
them apart from colors and color_attr):
    single_object  "a circle"                         one object, any colour
    two_objects    "a circle and a square"            two different shapes, any colours
    counting       "three red circles"                1-4 copies of one coloured shape
    colors         "a red circle"                     one object, colour named
    position       "a red circle left of a blue square"   left of / right of / above / below
    color_attr     "a red circle and a blue square"   two shapes with different colours: binding
Held-out compositions (never in the train split): every coloured prompt that names a pair in HELDOUT_PAIRS, and
every shape-only prompt that starts with HELDOUT_LEAD_SHAPE.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

IMAGE_SIZE = 64
BACKGROUND: tuple[int, int, int] = (18, 18, 26)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 200, 80),
    "blue": (50, 100, 235),
    "yellow": (240, 210, 50),
    "purple": (200, 60, 200),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("one", "two", "three", "four")
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
Split = Literal["train", "heldout"]

HELDOUT_PAIRS = frozenset({("blue", "circle"), ("yellow", "square"), ("purple", "triangle")})
HELDOUT_LEAD_SHAPE = "triangle"

MIN_SIZE = 6.0  # pixels, half-extent
MAX_SIZE = 10.0
GAP = 3.0  # pixels, least space between object boxes and between a box and the image border
SQUARE_HALF_SIDE = 0.85  # square half-side / size, so a square's area is close to a circle's of the same size
_PLACEMENT_TRIES = 50  # random positions tried for one object before the layout restarts
_LAYOUT_TRIES = 1000

_PIXEL_CENTRES = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
Box = tuple[float, float, float]  # (x, y, size) in pixels


@dataclass(frozen=True)
class ObjectSpec:
    """One kind of object a caption asks for; color None when the caption names no colour (any colour fits)."""

    shape: str
    color: str | None = None

    @property
    def phrase(self) -> str:
        """The words for this object in a caption, singular: "red circle" or "circle"."""
        return self.shape if self.color is None else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """The structure a caption is made from.

    objects: one kind (single_object, colors, counting) or two (two_objects, color_attr, position).
    count: counting only, how many copies of objects[0] (1-4).
    relation: position only, objects[0] <relation> objects[1], one of RELATIONS.
    """

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int | None = None
    relation: str | None = None

    def required_count(self) -> int:
        """``count`` of a counting spec; raises ValueError when it is missing (a spec built wrong)."""
        if self.count is None:
            raise ValueError(f"a {self.category} spec needs a count: {self!r}")
        return self.count


@dataclass(frozen=True)
class PlacedObject:
    """An object drawn in a scene: centre (x, y) and size (half-extent) in pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    """A rendered scene: its spec, the objects drawn, and the read-only [IMAGE_SIZE, IMAGE_SIZE, 3] uint8 image."""

    spec: PromptSpec
    objects: tuple[PlacedObject, ...]
    image: np.ndarray = field(compare=False, repr=False)

    @property
    def caption(self) -> str:
        return caption(self.spec)

    @property
    def category(self) -> str:
        return self.spec.category


def caption(spec: PromptSpec) -> str:
    """The caption text of a spec, e.g. "three red circles" or "a red circle left of a blue square"."""
    first = spec.objects[0].phrase
    if spec.category == "counting":
        count = spec.required_count()
        plural = "s" if count > 1 else ""
        return f"{NUMBER_WORDS[count - 1]} {first}{plural}"
    if spec.category == "position":
        return f"a {first} {spec.relation} a {spec.objects[1].phrase}"
    return " and ".join(f"a {obj.phrase}" for obj in spec.objects)


@functools.cache
def all_specs(category: str) -> tuple[PromptSpec, ...]:
    """Every composition of a category, in a fixed order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    plain = [ObjectSpec(shape) for shape in SHAPES]
    colored = [ObjectSpec(shape, color) for color in COLORS for shape in SHAPES]
    if category == "single_object":
        return tuple(PromptSpec(category, (obj,)) for obj in plain)
    if category == "two_objects":
        return tuple(PromptSpec(category, pair) for pair in itertools.permutations(plain, 2))
    if category == "counting":
        counts = range(1, len(NUMBER_WORDS) + 1)
        return tuple(PromptSpec(category, (obj,), count=n) for n in counts for obj in colored)
    if category == "colors":
        return tuple(PromptSpec(category, (obj,)) for obj in colored)
    if category == "position":
        pairs = itertools.permutations(colored, 2)
        return tuple(PromptSpec(category, pair, relation=rel) for pair in pairs for rel in RELATIONS)
    pairs = itertools.permutations(colored, 2)
    return tuple(PromptSpec(category, (a, b)) for a, b in pairs if a.shape != b.shape and a.color != b.color)


def is_heldout(spec: PromptSpec) -> bool:
    """Whether a composition belongs to the held-out split (see the module docstring for the rule)."""
    if spec.objects[0].color is None:
        return spec.objects[0].shape == HELDOUT_LEAD_SHAPE
    return any((obj.color, obj.shape) in HELDOUT_PAIRS for obj in spec.objects)


@functools.cache
def split_specs(category: str, split: Split) -> tuple[PromptSpec, ...]:
    """The compositions of a category in one split, in the order of all_specs."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    return tuple(spec for spec in all_specs(category) if is_heldout(spec) == (split == "heldout"))


def train_prompts(category: str | None = None) -> list[str]:
    """Captions of the train split, of one category or (None) of all categories in CATEGORIES order."""
    return _split_prompts("train", category)


def heldout_prompts(category: str | None = None) -> list[str]:
    """Captions of the held-out split, of one category or (None) of all categories in CATEGORIES order."""
    return _split_prompts("heldout", category)


def _split_prompts(split: Split, category: str | None) -> list[str]:
    categories = CATEGORIES if category is None else (category,)
    return [caption(spec) for cat in categories for spec in split_specs(cat, split)]


def make_spec(category: str, rng: np.random.Generator, split: Split | None = None) -> PromptSpec:
    """A composition of the category drawn uniformly, from one split or (None) from all of them."""
    candidates = all_specs(category) if split is None else split_specs(category, split)
    return candidates[rng.integers(len(candidates))]


def shape_mask(shape: str, x: float, y: float, size: float) -> np.ndarray:
    """[IMAGE_SIZE, IMAGE_SIZE] bool: pixels whose centre lies in the shape centred at (x, y) with that size.

    The triangle points up: apex at (x, y - size), base from (x - size, y + size) to (x + size, y + size).
    """
    dx = _PIXEL_CENTRES[None, :] - x
    dy = _PIXEL_CENTRES[:, None] - y
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    if shape == "square":
        half = SQUARE_HALF_SIDE * size
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        return (dy <= size) & (np.abs(dx) <= (dy + size) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(objects: tuple[PlacedObject, ...]) -> np.ndarray:
    """[IMAGE_SIZE, IMAGE_SIZE, 3] uint8 image of the objects on the background, later objects on top."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        image[shape_mask(obj.shape, obj.x, obj.y, obj.size)] = PALETTE[obj.color]
    return image


def is_arranged(first: PlacedObject | Box, relation: str, second: PlacedObject | Box) -> bool:
    """Whether first <relation> second holds with their boxes apart along that axis by GAP pixels.

    first, second: PlacedObject or (x, y, size) in pixels; y grows downwards, so "above" means a smaller y.
    """
    (x1, y1, s1), (x2, y2, s2) = _box(first), _box(second)
    reach = s1 + s2 + GAP
    offsets = {"left of": x2 - x1, "right of": x1 - x2, "above": y2 - y1, "below": y1 - y2}
    if relation not in offsets:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    return offsets[relation] >= reach


def render(spec: PromptSpec, rng: np.random.Generator) -> tuple[np.ndarray, tuple[PlacedObject, ...]]:
    """Draw a scene that satisfies the spec: no overlaps (boxes GAP apart), inside the border, relation held.

    Shapes with no colour in the spec get a random palette colour. Returns the [IMAGE_SIZE, IMAGE_SIZE, 3] uint8
    image and the objects drawn (for counting, spec.count copies of the one kind; for position, objects[0] first).
    """
    kinds = [(obj.shape, obj.color or COLORS[rng.integers(len(COLORS))]) for obj in spec.objects]
    if spec.category == "counting":
        kinds = kinds * spec.required_count()
    boxes = _layout(len(kinds), spec.relation, rng)
    objects = tuple(PlacedObject(shape, color, *box) for (shape, color), box in zip(kinds, boxes, strict=True))
    return draw(objects), objects


def sample_scene(seed: int, category: str | None = None, split: Split | None = None) -> Scene:
    """A scene determined by the seed alone: category (uniform when None), composition (from split), layout."""
    rng = np.random.default_rng(seed)
    if category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    spec = make_spec(category, rng, split)
    image, objects = render(spec, rng)
    image.flags.writeable = False
    return Scene(spec, objects, image)


def _box(obj: PlacedObject | Box) -> Box:
    return (obj.x, obj.y, obj.size) if isinstance(obj, PlacedObject) else obj


def _apart(a: Box, b: Box) -> bool:
    """Whether the boxes centre +- size of a and b are at least GAP apart along x or along y."""
    reach = a[2] + b[2] + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _layout(count: int, relation: str | None, rng: np.random.Generator) -> list[Box]:
    """count boxes (x, y, size) in pixels, pairwise apart; with a relation, box 0 <relation> box 1."""
    for _ in range(_LAYOUT_TRIES):
        boxes: list[Box] = []
        while len(boxes) < count and (box := _free_box(boxes, relation, rng)) is not None:
            boxes.append(box)
        if len(boxes) == count:
            return boxes
    raise RuntimeError(f"could not lay out {count} objects in {_LAYOUT_TRIES} tries")


def _free_box(boxes: list[Box], relation: str | None, rng: np.random.Generator) -> Box | None:
    """A random box apart from all boxes (and related to boxes[0] when relation is set), or None if none found."""
    for _ in range(_PLACEMENT_TRIES):
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        x, y = (float(v) for v in rng.uniform(GAP + size, IMAGE_SIZE - GAP - size, size=2))
        box = (x, y, size)
        related = relation is None or not boxes or is_arranged(boxes[0], relation, box)
        if related and all(_apart(box, other) for other in boxes):
            return box
    return None


_SHAPE_WORDS = {**{shape: shape for shape in SHAPES}, **{f"{shape}s": shape for shape in SHAPES}}
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_VOCABULARY = frozenset({"a", "and", "of", *COLORS, *_SHAPE_WORDS, *NUMBER_WORDS, *_RELATION_WORDS})


def parse_caption(text: str) -> PromptSpec:
    """The spec of a caption made by the templates (case, surrounding space and a final period are ignored).

    Raises ValueError naming the first unknown word, or saying where the caption leaves the templates.
    """
    words = deque(text.strip().rstrip(".").lower().split())
    unknown = [word for word in words if word not in _VOCABULARY]
    if unknown:
        raise ValueError(f"unknown word {unknown[0]!r} in caption {text!r}")
    if words and words[0] in NUMBER_WORDS:
        count = NUMBER_WORDS.index(words.popleft()) + 1
        spec = PromptSpec("counting", (_read_object(words, text),), count=count)
    else:
        _expect(words, "a", text)
        first = _read_object(words, text)
        if not words:
            spec = PromptSpec("single_object" if first.color is None else "colors", (first,))
        elif words[0] == "and":
            words.popleft()
            _expect(words, "a", text)
            second = _read_object(words, text)
            spec = PromptSpec("two_objects" if first.color is None else "color_attr", (first, second))
        else:
            relation = _read_relation(words, text)
            _expect(words, "a", text)
            spec = PromptSpec("position", (first, _read_object(words, text)), relation=relation)
    if words:
        raise ValueError(f"unexpected word {words[0]!r} after the end of a template in caption {text!r}")
    if spec not in _spec_set(spec.category):
        raise ValueError(f"caption {text!r} is not a valid {spec.category} composition (see scenes.all_specs)")
    return spec


@functools.cache
def _spec_set(category: str) -> frozenset[PromptSpec]:
    return frozenset(all_specs(category))


def _next_word(words: deque[str], wanted: str, text: str) -> str:
    if not words:
        raise ValueError(f"caption {text!r} ends where {wanted} was expected")
    return words.popleft()


def _expect(words: deque[str], expected: str, text: str) -> None:
    word = _next_word(words, repr(expected), text)
    if word != expected:
        raise ValueError(f"unexpected word {word!r} in caption {text!r}; expected {expected!r}")


def _read_object(words: deque[str], text: str) -> ObjectSpec:
    """Pop "[colour] shape" off the words."""
    word = _next_word(words, "a colour or shape", text)
    color = None
    if word in PALETTE:
        color, word = word, _next_word(words, "a shape", text)
    if word not in _SHAPE_WORDS:
        raise ValueError(f"unexpected word {word!r} in caption {text!r}; expected a shape")
    return ObjectSpec(_SHAPE_WORDS[word], color)


def _read_relation(words: deque[str], text: str) -> str:
    """Pop "left of" / "right of" / "above" / "below" off the words."""
    word = _next_word(words, "a relation", text)
    if word not in _RELATION_WORDS:
        raise ValueError(f"unexpected word {word!r} in caption {text!r}; expected 'and' or a relation")
    if word in ("left", "right"):
        _expect(words, "of", text)
    return _RELATION_WORDS[word]
