"""Random-initialised stand-ins for the model-backed rewards (rewards/vision.py), for tests and timing offline.

No reward weights can be downloaded here, so ``build_stand_in(name, folder)`` builds a model of the same classes as
the real one, with random weights, and saves it in the layout the real weights come in (a ``save_pretrained`` folder,
a ``.pth`` state dict, an open_clip checkpoint ``{"state_dict": ...}``), with tokenizer files it writes itself. The
returned options load it through the same code path a user with the real weights takes:
``rewards.load(name, **build_stand_in(name, folder))``.

``size="tiny"`` makes small models (seconds on a CPU; ImageReward's BLIP vision tower is fixed at ViT-L by the
image-reward package, so that one stays large). ``size="real"`` uses the real architectures' sizes (random
weights), so a benchmark can time the real compute per image: CLIP ViT-H-14 for PickScore and HPSv2.1 (about 1.0 B
parameters, ~4 GB saved), CLIP ViT-L/14 for CLIPScore and aesthetic (0.43 B, ~1.7 GB), BLIP ViT-L + BERT-base for
ImageReward (0.45 B, ~1.8 GB); each fits in 24 GB of RAM.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

from sfgrpo_core.rewards import require

NAMES = ("pickscore", "clip", "aesthetic", "hps", "imagereward")
SIZES = ("tiny", "real")

CLIP_TEXT_CONTEXT = 77
SPECIAL_CLIP_TOKENS = ("<|startoftext|>", "<|endoftext|>")

# Architecture sizes: (hidden, intermediate, layers, heads) per tower, image size, patch, projection, activation.
CLIP_SIZES: dict[str, dict[str, Any]] = {
    # PickScore_v1 = laion CLIP-ViT-H-14 (gelu).
    "vit-h-14": {"text": (1024, 4096, 24, 16), "vision": (1280, 5120, 32, 16), "image": 224, "patch": 14,
                 "projection": 1024, "act": "gelu"},
    # openai/clip-vit-large-patch14 (quick_gelu).
    "vit-l-14": {"text": (768, 3072, 12, 12), "vision": (1024, 4096, 24, 16), "image": 224, "patch": 14,
                 "projection": 768, "act": "quick_gelu"},
    "tiny": {"text": (32, 64, 2, 2), "vision": (32, 64, 2, 2), "image": 32, "patch": 8, "projection": 16,
             "act": "quick_gelu"},
}
# The aesthetic head is fixed at 768 inputs (CLIP ViT-L/14's projection), so its tiny CLIP projects to 768.
TINY_AESTHETIC_PROJECTION = 768

HPS_TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": CLIP_TEXT_CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# BLIP's BERT text encoder (ImageReward's med_config.json); hidden_size stays 768: the package's MLP takes 768.
MED_CONFIG_REAL = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 1024,
    "add_cross_attention": True,
}
MED_CONFIG_TINY = {**MED_CONFIG_REAL, "intermediate_size": 64, "num_hidden_layers": 1, "max_position_embeddings": 64}
BERT_REPO = "bert-base-uncased"
BERT_SNAPSHOT = "0" * 40  # the commit hash of the hub-cache snapshot written for the stand-in tokenizer


def build_stand_in(name: str, folder: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, str]:
    """Build a random-initialised stand-in for reward ``name`` into ``folder``; returns the options that load it.

    Args:
        name: one of NAMES.
        folder: created if missing; the files are written under it.
        size: "tiny" (small, fast) or "real" (the real architecture sizes, random weights).
        seed: torch seed for the random weights.

    For "imagereward" the image-reward package must be importable, and the process must have been started with
    ``HF_HOME=imagereward_hf_home(folder)`` and ``HF_HUB_OFFLINE=1``: the package loads the tokenizer
    'bert-base-uncased' from the hub by name, so a stand-in one is written into that (throw-away) hub cache.
    """
    if name not in NAMES:
        raise ValueError(f"no stand-in for reward {name!r}; known: {', '.join(NAMES)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    builders = {"pickscore": _pickscore, "clip": _clip, "aesthetic": _aesthetic, "hps": _hps,
                "imagereward": _imagereward}
    return builders[name](folder, size)


# ----------------------------------------------------------------------------------------------------- CLIP (HF)


def bytes_to_unicode() -> list[str]:
    """CLIP's byte-level BPE alphabet: 256 printable characters standing for the bytes 0-255, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_vocabulary(size: str) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges) of a CLIP BPE tokenizer. "tiny": the byte alphabet and its end-of-word forms,
    no merges (514 tokens; text becomes one token per character). "real": CLIP's own 49,408-token vocabulary, built
    the way CLIP builds it from the BPE merges open_clip ships (bpe_simple_vocab_16e6.txt.gz)."""
    alphabet = bytes_to_unicode()
    tokens = alphabet + [token + "</w>" for token in alphabet]
    merges: list[str] = []
    if size == "real":
        open_clip = require("open_clip", "hps", "the real-size CLIP tokenizer")
        bpe = Path(str(open_clip.__file__)).parent / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
        merges = lines[1 : 49152 - 256 - 2 + 1]
        tokens += ["".join(merge.split()) for merge in merges]
    return tokens + list(SPECIAL_CLIP_TOKENS), merges


def write_clip_processor(folder: Path, size: str, image_size: int) -> Any:
    """A CLIPProcessor (CLIPTokenizer from vocab.json/merges.txt written here + CLIPImageProcessor resizing the
    shorter edge to ``image_size`` and centre-cropping it) saved into ``folder``; returns it."""
    transformers = require("transformers", "clip", "the CLIP stand-in")
    tokens, merges = clip_vocabulary(size)
    files = folder  # vocab.json and merges.txt stay beside the saved processor, as in the hub repos
    files.mkdir(parents=True, exist_ok=True)
    (files / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (files / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    (files / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_TEXT_CONTEXT, "bos_token": SPECIAL_CLIP_TOKENS[0],
        "eos_token": SPECIAL_CLIP_TOKENS[1], "unk_token": SPECIAL_CLIP_TOKENS[1], "pad_token": SPECIAL_CLIP_TOKENS[1],
        "do_lower_case": True}))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(files))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                      crop_size={"height": image_size, "width": image_size})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(str(folder))
    image_processor.save_pretrained(str(folder))  # preprocessor_config.json too, as the hub repos (and transformers 4)
    return processor


def write_clip_model(folder: Path, sizes: dict[str, Any], tokenizer: Any, projection: int | None = None) -> None:
    """A random-initialised transformers CLIPModel of ``sizes`` (CLIP_SIZES entry) saved with save_pretrained; its
    logit scale set to 100 (the trained models' value) rather than the 1/0.07 of a fresh init."""
    transformers = require("transformers", "clip", "the CLIP stand-in")
    (text_hidden, text_inter, text_layers, text_heads) = sizes["text"]
    (vision_hidden, vision_inter, vision_layers, vision_heads) = sizes["vision"]
    vocab_size = len(tokenizer.get_vocab())
    config = transformers.CLIPConfig(
        text_config={"hidden_size": text_hidden, "intermediate_size": text_inter, "num_hidden_layers": text_layers,
                     "num_attention_heads": text_heads, "max_position_embeddings": CLIP_TEXT_CONTEXT,
                     "vocab_size": vocab_size, "hidden_act": sizes["act"], "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": vision_hidden, "intermediate_size": vision_inter,
                       "num_hidden_layers": vision_layers, "num_attention_heads": vision_heads,
                       "image_size": sizes["image"], "patch_size": sizes["patch"], "hidden_act": sizes["act"]},
        projection_dim=projection or sizes["projection"],
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)).item())
    model.save_pretrained(str(folder))


def _clip_sizes(size: str, real: str) -> dict[str, Any]:
    return CLIP_SIZES[real if size == "real" else "tiny"]


def _pickscore(folder: Path, size: str) -> dict[str, str]:
    """Layout of the two hub repos PickScore loads: a processor folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and
    a model folder (yuvalkirstain/PickScore_v1)."""
    sizes = _clip_sizes(size, "vit-h-14")
    processor = write_clip_processor(folder / "processor", size, sizes["image"])
    write_clip_model(folder / "model", sizes, processor.tokenizer)
    return {"model": str(folder / "model"), "processor": str(folder / "processor")}


def _clip(folder: Path, size: str) -> dict[str, str]:
    """Layout of openai/clip-vit-large-patch14: model and processor in one folder."""
    sizes = _clip_sizes(size, "vit-l-14")
    processor = write_clip_processor(folder / "model", size, sizes["image"])
    write_clip_model(folder / "model", sizes, processor.tokenizer)
    return {"model": str(folder / "model")}


def _aesthetic(folder: Path, size: str) -> dict[str, str]:
    """openai/clip-vit-large-patch14's layout plus the head as ``sac+logos+ava1-l14-linearMSE.pth`` (a torch-saved
    state dict of tensors with the real file's key names, readable with weights_only=True)."""
    from sfgrpo_core.rewards.vision import AESTHETIC_HEAD_FILE, AestheticHead

    sizes = _clip_sizes(size, "vit-l-14")
    processor = write_clip_processor(folder / "model", size, sizes["image"])
    write_clip_model(folder / "model", sizes, processor.tokenizer, projection=TINY_AESTHETIC_PROJECTION)
    head = AestheticHead(TINY_AESTHETIC_PROJECTION)
    torch.save(head.state_dict(), folder / AESTHETIC_HEAD_FILE)
    return {"model": str(folder / "model"), "head": str(folder / AESTHETIC_HEAD_FILE)}


# ----------------------------------------------------------------------------------------------------- HPSv2.1


def _hps(folder: Path, size: str) -> dict[str, str]:
    """An open_clip CLIP (ViT-H-14 for "real", a tiny custom config for "tiny", written as an open_clip model config
    JSON) saved like HPS_v2.1_compressed.pt: ``torch.save({"state_dict": model.state_dict()})`` in a folder."""
    from sfgrpo_core.rewards.vision import HPS_ARCH, HPS_V21_FILE, open_clip_arch

    open_clip = require("open_clip", "hps", "the HPS stand-in")
    options: dict[str, str] = {}
    if size == "real":
        name = HPS_ARCH
    else:
        config = folder / "sfgrpo-hps-tiny.json"
        config.write_text(json.dumps(HPS_TINY_CONFIG, indent=1))
        name = open_clip_arch(str(config))
        options["arch"] = str(config)
    model = open_clip.create_model(name, pretrained=None, device="cpu", output_dict=True)
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)).item())
    (folder / "hps").mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, folder / "hps" / HPS_V21_FILE)
    return {"model": str(folder / "hps"), **options}


# ----------------------------------------------------------------------------------------------------- ImageReward


def imagereward_hf_home(folder: str | Path) -> Path:
    """The HF_HOME to start the process that builds and loads the ImageReward stand-in with (with HF_HUB_OFFLINE=1):
    a throw-away hub cache under ``folder`` holding a stand-in 'bert-base-uncased' tokenizer."""
    return Path(folder) / "hf_home"


def bert_vocabulary(size: str) -> list[str]:
    """A WordPiece vocabulary: BERT's special tokens, a-z, 0-9, punctuation, '##' continuations and a few words;
    "real" pads it with unused tokens to bert-base-uncased's 30,522 entries."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *"0123456789", *".,!?'\"-:;()",
              *[f"##{letter}" for letter in letters], *[f"##{digit}" for digit in "0123456789"],
              "a", "the", "of", "photo", "cat", "dog", "red", "blue", "sign", "with", "on", "in"]
    tokens = list(dict.fromkeys(tokens))
    if size == "real":
        tokens += [f"[unused{index}]" for index in range(30522 - len(tokens))]
    return tokens


def write_bert_tokenizer_cache(hf_home: Path, size: str) -> None:
    """Write a stand-in 'bert-base-uncased' tokenizer (vocab.txt, tokenizer_config.json, config.json) into the hub
    cache of ``hf_home`` in huggingface_hub's cache layout (refs/main -> snapshots/<hash>/), marking the tokenizer
    files it lacks as absent (.no_exist) so that an offline load does not look for them."""
    repo = hf_home / "hub" / f"models--{BERT_REPO}"
    snapshot = repo / "snapshots" / BERT_SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(BERT_SNAPSHOT)
    (snapshot / "vocab.txt").write_text("\n".join(bert_vocabulary(size)) + "\n")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(bert_vocabulary(size))}))
    absent = repo / ".no_exist" / BERT_SNAPSHOT
    absent.mkdir(parents=True, exist_ok=True)
    for name in ("added_tokens.json", "special_tokens_map.json", "tokenizer.json", "chat_template.jinja",
                 "processor_config.json", "preprocessor_config.json"):
        (absent / name).touch()


def _imagereward(folder: Path, size: str) -> dict[str, str]:
    """The layout of the hub repo THUDM/ImageReward: a folder with ImageReward.pt (a torch-saved state dict of the
    package's ImageReward model) and med_config.json."""
    from sfgrpo_core.rewards.vision import IMAGEREWARD_FILE, IMAGEREWARD_MED_CONFIG, import_imagereward

    hf_home = imagereward_hf_home(folder).resolve()
    if Path(os.environ.get("HF_HOME", "")).expanduser().resolve() != hf_home or not _offline_env():
        raise ValueError(f"the ImageReward stand-in needs a process started with HF_HOME={hf_home} and "
                         "HF_HUB_OFFLINE=1 (the image-reward package loads the tokenizer 'bert-base-uncased' by "
                         "its hub name; the stand-in one is written into that throw-away cache)")
    package = import_imagereward()
    write_bert_tokenizer_cache(hf_home, size)
    repo = folder / "ImageReward"
    repo.mkdir(exist_ok=True)
    med_config = dict(MED_CONFIG_REAL if size == "real" else MED_CONFIG_TINY)
    med_config["vocab_size"] = len(bert_vocabulary(size)) + 2  # BLIP adds [DEC] and [ENC]
    (repo / IMAGEREWARD_MED_CONFIG).write_text(json.dumps(med_config, indent=1))
    model = package.ImageReward(med_config=str(repo / IMAGEREWARD_MED_CONFIG), device="cpu")
    for layer in model.mlp.layers:  # the package inits the MLP to ~0 output: give random scores a spread
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    torch.save(model.state_dict(), repo / IMAGEREWARD_FILE)
    return {"model": str(repo)}


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
