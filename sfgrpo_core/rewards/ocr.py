"""OCR reward (PaddleOCR's models in rapidocr-onnxruntime): 1 - normalized edit distance to the prompt's quoted text.

Flow-GRPO's OCR task (flow_grpo/ocr.py, ``OcrScorer``), reproduced rule for rule:

- target = the part of the prompt between its first pair of double quotes (``prompt.split('"')[1]``);
- recognised text = the texts of all detected lines whose recognition confidence is at least ``drop_score``
  (PaddleOCR's ``drop_score``, 0.5), joined with no separator in reading order (top to bottom, left to right);
- both lowercased with spaces (" ") removed; reward = 1 if the target is contained in the recognised text, else
  1 - min(levenshtein(recognised, target), len(target)) / len(target), so a score in [0, 1]: 0 when OCR reads
  nothing (or nothing close), 1 for the exact text.

The OCR engine is rapidocr-onnxruntime 1.4.4, whose wheel ships PaddleOCR's PP-OCRv4 detection and recognition
models as ONNX files: nothing is downloaded at run time. It runs with PaddleOCR 2.x's detection settings (longest
side limited to 960, DB thresh 0.3, box thresh 0.6, unclip ratio 1.5, no dilation) and no angle classifier, as
Flow-GRPO's ``PaddleOCR(use_angle_cls=False, lang="en")`` does. Two differences remain: the bundled models are
PaddleOCR's "ch" PP-OCRv4 det/rec (Chinese + English characters) where Flow-GRPO's ``lang="en"`` loads the English
recognition model, and rapidocr pads very flat images (height <= 30 px or width/height > 8) before detection.
As in Flow-GRPO, the RGB pixel array goes to the engine as it is (the engine, like PaddleOCR, reads an array as BGR).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import RewardInputError, register, require
from .builtin import to_pil_images

# PaddleOCR 2.x's defaults (tools/infer/utility.py) for DB text detection, which Flow-GRPO's PaddleOCR uses.
_PADDLE_DETECTION = {"det_limit_type": "max", "det_limit_side_len": 960, "det_thresh": 0.3, "det_box_thresh": 0.6,
                     "det_unclip_ratio": 1.5, "det_use_dilation": False, "det_score_mode": "fast"}


def quoted_text(prompt: str) -> str:
    """The text an OCR prompt asks to render: the part between its first pair of straight double quotes.

    Raises:
        RewardInputError: naming the prompt, if it has no pair of double quotes or only spaces between them.
    """
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        found = "no text between its double quotes" if len(parts) >= 3 else "no text in double quotes"
        raise RewardInputError(
            f"OCR reward: prompt {prompt!r} has {found}; put the text the image should show between straight "
            f'double quotes, e.g. \'a shop sign that says "OPEN"\' (the reward compares what OCR reads with the '
            f"text between the first pair of \" in the prompt)")
    return parts[1]


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalisation: spaces (" ") removed, lowercased."""
    return text.replace(" ", "").lower()


def ocr_text_score(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR score of the text read from an image against the target text, in [0, 1].

    Both are normalised (spaces removed, lowercased); the score is 1 if the target is contained in the recognised
    text (extra text is not penalised), else 1 - min(levenshtein(recognised, target), len(target)) / len(target).

    Raises:
        ValueError: if the target is empty after normalisation.
    """
    levenshtein = require("rapidfuzz.distance.Levenshtein", "ocr", "ocr")
    recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        raise ValueError("the OCR target text is empty (after removing spaces)")
    if target in recognized:
        return 1.0
    distance = int(levenshtein.distance(recognized, target))
    return 1.0 - min(distance, len(target)) / len(target)


class OcrReward:
    """Flow-GRPO's OCR reward in [0, 1]: 1 - capped edit distance of PP-OCRv4's reading to the prompt's "quoted" text.

    Options:
        use_det: detect text lines first (PaddleOCR's default). False reads the whole image as one text line
            (PaddleOCR's ``det=False``): much faster, but only meaningful for images that are a crop of one line of
            text; a square scene is squeezed to 48 px high and reads as almost nothing.
        use_cls: run the 0/180-degree text-angle classifier on each line (Flow-GRPO: off, ``use_angle_cls=False``).
        min_size: with detection, an image whose shorter side is below this many pixels is first upscaled
            (bicubic, aspect kept) so that its shorter side is ``min_size``; 0 turns it off. The detector misses
            the ~10 px glyphs of a 64 px image; at 128 px it finds them. Images of at least ``min_size`` px
            (Flow-GRPO's 512 px) are read as they are.
        max_size: with detection, an image whose longer side is above this is first downscaled (Lanczos) to it, a
            speed option for scoring many large images; None (the default, as Flow-GRPO) keeps the size.
        drop_score: recognised lines with a confidence below this are ignored (PaddleOCR's ``drop_score``).
        num_threads: onnxruntime intra-op threads per model; 0 leaves onnxruntime's default (all cores).

    The OCR engine is created on the first call and kept for the reward's lifetime. A prompt without quoted text
    raises RewardInputError (never a missing score); an image where OCR reads nothing scores per the formula (0
    unless the target is empty, which is refused). An error of the engine itself propagates, so ``rewards.score``
    marks that image missing (Flow-GRPO scored it 0).
    """

    def __init__(self, use_det: bool = True, use_cls: bool = False, min_size: int = 128, max_size: int | None = None,
                 drop_score: float = 0.5, num_threads: int = 0):
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0 (0: no upscaling), got {min_size}")
        if max_size is not None and (max_size < 32 or max_size < min_size):
            raise ValueError(f"max_size must be None or >= max(32, min_size={min_size}), got {max_size}")
        if not 0.0 <= drop_score <= 1.0:
            raise ValueError(f"drop_score must be in [0, 1], got {drop_score}")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0: onnxruntime's default), got {num_threads}")
        self.use_det, self.use_cls = bool(use_det), bool(use_cls)
        self.min_size, self.max_size = int(min_size), max_size
        self.drop_score, self.num_threads = float(drop_score), int(num_threads)
        self._engine: Any = None

    def engine(self) -> Any:
        """The rapidocr ``RapidOCR`` engine (created on first use; raises MissingExtraError without the extra)."""
        if self._engine is None:
            rapidocr = require("rapidocr_onnxruntime", "ocr", "ocr")
            require("rapidfuzz.distance.Levenshtein", "ocr", "ocr")  # fail before any OCR work, not after it
            threads = {}
            if self.num_threads:
                threads = {"intra_op_num_threads": self.num_threads, "inter_op_num_threads": 1}
            self._engine = rapidocr.RapidOCR(text_score=self.drop_score, print_verbose=False,
                                             **_PADDLE_DETECTION, **threads)
        return self._engine

    def prepare(self, image: Image.Image) -> Image.Image:
        """The image as the engine reads it: resized per ``max_size`` / ``min_size`` when detecting (RGB)."""
        image = image.convert("RGB")
        if not self.use_det:
            return image
        width, height = image.size
        if self.max_size is not None and max(width, height) > self.max_size:
            scale = self.max_size / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        if self.min_size and min(width, height) < self.min_size:
            scale = self.min_size / min(width, height)
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BICUBIC)
        return image

    def read_text(self, image: Image.Image) -> str:
        """The text OCR reads in ``image`` (any size, RGB): the lines of confidence >= ``drop_score`` joined with no
        separator in reading order; "" if it finds none."""
        pixels = np.array(self.prepare(image))  # RGB as it is, as Flow-GRPO passes np.array(image) to PaddleOCR
        result, _ = self.engine()(pixels, use_det=self.use_det, use_cls=self.use_cls, use_rec=True)
        if not result:
            return ""
        # With detection each item is [box, text, confidence]; without, [text, confidence].
        lines = [(item[-2], float(item[-1])) for item in result]
        return "".join(str(text) for text, confidence in lines if confidence >= self.drop_score and confidence > 0)

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 in [0, 1] of images (PIL list or uint8 [B, H, W, 3]) against their prompts' quoted text.

        Raises:
            RewardInputError: if a prompt has no text in double quotes (before any image is read).
        """
        pil_images = to_pil_images(images)
        if len(pil_images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {len(pil_images)} images")
        targets = [quoted_text(prompt) for prompt in prompts]
        scores = [ocr_text_score(self.read_text(image), target)
                  for image, target in zip(pil_images, targets, strict=True)]
        return torch.tensor(scores, dtype=torch.float32)


register("ocr", OcrReward, replace=False)
