"""SFGRPOTrainLoRA: fine-tune a LoRA on a ComfyUI MODEL with Stepwise-Flow-GRPO (or Flow-GRPO) inside a graph.

The node runs sfgrpo_core's trainer (the same loop as ``sfgrpo train``) on ``ComfyFlowModel`` and hands back the
MODEL with the LoRA applied the way the stock LoRA loaders apply it, the LoRA as LORA_MODEL (for the stock SaveLoRA),
its metrics as LOSS_MAP (for the stock loss graph) and a reward-curve image. Each run gets its own folder under
ComfyUI's output directory (config.json, metrics.jsonl, checkpoints, the LoRA, reward_curve.png); the final LoRA is
also written under the first "loras" model folder, so LoraLoaderModelOnly lists it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io, ui
from safetensors.torch import load_file

from ..sfgrpo_core.atomic import atomic_write_bytes, atomic_write_text
from ..sfgrpo_core.config import Config, config_from_dict
from ..sfgrpo_core.models.precision import fast_autocast_dtype
from ..sfgrpo_core.training.checkpoint import checkpoint_iteration, latest_checkpoint
from ..sfgrpo_core.training.metrics import TRAINING_EVENT, json_safe
from ..sfgrpo_core.training.runs import loss_map, run_folder, summary
from ..sfgrpo_core.training.trainer import TrainHooks, train
from .comfy_model import (
    COMFYUI_LORA_FILE,
    ComfyFlowModel,
    patched_model_sampling,
    require_flow_patcher,
    trainable,
)
from .rewards import on_compute_device
from .types import CATEGORY, LoadedReward, Prompts, PromptSet, Reward, image_tensor
from .widgets import config_input

RUNS_FOLDER = "sfgrpo"
# The x0-estimate strip in each training event: pixels high per estimate, and the gap between estimates.
STRIP_HEIGHT, STRIP_GAP = 64, 2
REWARD_DECODE = ("auto", "vae dtype", "bfloat16 autocast")


def decode_autocast(reward_decode: str, vae: Any) -> torch.dtype | None:
    """The autocast dtype of the reward's decodes for the reward_decode widget: 'auto' bfloat16 where it is native
    and measured faster on the VAE's device (sfgrpo_core.models.precision), else the VAE's own dtype (None)."""
    if reward_decode == "auto":
        return fast_autocast_dtype(getattr(vae, "device", "cpu"))
    return torch.bfloat16 if reward_decode == "bfloat16 autocast" else None

# (widget id, config section, config field, node default or None for the config's own default)
SETTINGS = (
    ("method", "credit", "method", None),
    ("sde", "sampler", "sde", None),
    ("eta", "sampler", "eta", None),
    ("noise_level", "sampler", "noise_level", None),
    ("steps", "sampler", "steps", None),
    ("substeps", "credit", "substeps", None),
    ("min_train_std", "sampler", "min_train_std", None),
    ("group_size", "train", "group_size", None),
    ("groups_per_iteration", "train", "groups_per_iteration", None),
    ("iterations", "train", "iterations", None),
    ("lr", "optim", "lr", None),
    ("clip_range", "optim", "clip_range", None),
    ("kl_beta", "optim", "kl_beta", None),
    ("rank", "lora", "rank", None),
    ("alpha", "lora", "alpha", None),
    ("seed", "train", "seed", None),
    ("checkpoint_every", "train", "checkpoint_every", None),
    ("eval_every", "train", "eval_every", None),
    ("eval_samples", "train", "eval_samples", 4),
    ("micro_batch_size", "optim", "micro_batch_size", None),
)
# Widgets added after workflows were saved: optional inputs, so those workflows stay valid (config defaults apply).
OPTIONAL_SETTINGS = (
    ("lr_schedule", "optim", "lr_schedule", None),
    ("lr_final_ratio", "optim", "lr_final_ratio", None),
    ("lr_decay_iterations", "optim", "lr_decay_iterations", None),
)
# Added after reward_decode: a saved workflow's widget values map by position, so new widgets go last.
TRAILING_SETTINGS = (
    ("trackers", "train", "trackers", None),
)


def check_inputs(model: Any, vae: Any, prompts: Any, reward: Any, width: int, height: int) -> None:
    """What a node that rolls out a MODEL needs (Train LoRA, Credit Signal): a flow model, its VAE, prompts, a reward
    and a size in multiples of 16; ValueError naming the input and the fix otherwise."""
    require_flow_patcher(model)
    if vae is None:
        raise ValueError("vae: no VAE connected; connect the VAE of the model")
    for name, value in (("width", width), ("height", height)):
        if value % 16:
            raise ValueError(f"{name}: {value} is not a multiple of 16; use {value - value % 16 or 16}")
    if not isinstance(prompts, PromptSet) or not prompts.texts:
        raise ValueError("prompts: no prompts; connect a Prompts node with at least one prompt")
    if not isinstance(reward, LoadedReward):
        raise ValueError("reward: connect a Load Reward node")


def runs_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / RUNS_FOLDER


def loras_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def merge_prompts(*sets: PromptSet | None) -> PromptSet:
    """One prompt set holding every text of ``sets`` once (the first conditioning of a repeated text wins)."""
    merged: dict[str, Any] = {}
    for prompt_set in sets:
        if prompt_set is not None:
            for text, conditioning in zip(prompt_set.texts, prompt_set.conditionings, strict=True):
                merged.setdefault(text, conditioning)
    return PromptSet(tuple(merged), tuple(merged.values()))


def build_config(settings: dict[str, Any], *, reward: LoadedReward, prompts: PromptSet,
                 eval_prompts: PromptSet | None, run_dir: Path, device: str, shift: float) -> Config:
    """The run's Config from the node's widgets (ConfigError names the config field and the fix)."""
    data: dict[str, dict[str, Any]] = {}
    for widget, section, name, _ in SETTINGS:
        data.setdefault(section, {})[name] = settings[widget]
    for widget, section, name, _ in (*OPTIONAL_SETTINGS, *TRAILING_SETTINGS):
        if settings.get(widget) is not None:
            data.setdefault(section, {})[name] = settings[widget]
    data["model"] = {"name": "comfyui", "device": device}
    data["sampler"]["shift"] = shift
    data["train"].update(reward=reward.name, reward_options=reward.options_json, prompts=list(prompts.texts),
                         eval_prompts=list(eval_prompts.texts) if eval_prompts else [], output_dir=str(run_dir))
    if eval_prompts is None:
        data["train"]["eval_every"] = 0
    return config_from_dict(data)


class TrainingProgress:
    """ComfyUI's progress bar over every denoising step of every rollout, previewing one x0 estimate; after each
    iteration, a "sfgrpo.training" websocket event {"node", "prompt_id", "record", "estimates"} goes to the page:
    the iteration's metrics record and the x0-estimate strip of the iteration's first trajectory (one decoded
    estimate per step, ``estimate_strip``). ``sfgrpo run`` prints a line of each; the training view
    (web/js/sfgrpo_training_view.js) plots the records and shows the strip."""

    def __init__(self, patcher: Any, decode: Callable[[torch.Tensor], torch.Tensor], steps: int, iterations: int,
                 start_iteration: int, node_id: str | None):
        import latent_preview

        self.steps, self.total = steps, steps * iterations
        self.iteration = start_iteration
        self.node_id = node_id
        self.decode = decode
        self.estimates: list[torch.Tensor] = []
        self.callback = latent_preview.prepare_callback(patcher, self.total)

    def on_rollout_step(self, step: int, steps: int, x: torch.Tensor, x0_estimate: torch.Tensor) -> None:
        if step == 0:
            self.estimates = []
        self.estimates.append(x0_estimate[:1].detach().float().cpu())
        self.callback(self.iteration * self.steps + step, x0_estimate[:1].detach(), x[:1].detach(), self.total)

    def on_iteration(self, record: dict[str, Any]) -> None:
        self.iteration = record["iteration"] + 1
        server = _prompt_server()
        if server is not None:
            event = {"node": self.node_id, "prompt_id": server.last_prompt_id, "record": json_safe(record)}
            if self.estimates:
                event["estimates"] = {"png": estimate_strip(self.decode(torch.cat(self.estimates))),
                                      "steps": len(self.estimates)}
            server.send_sync(TRAINING_EVENT, event, server.client_id)


def estimate_strip(images: torch.Tensor, height: int = STRIP_HEIGHT) -> str:
    """uint8 images [T, H, W, 3] side by side, each scaled to ``height`` pixels high, as a PNG data URL."""
    from PIL import Image

    tiles = [Image.fromarray(image.numpy()) for image in images]
    tiles = [tile.resize((max(1, round(tile.width * height / tile.height)), height), Image.Resampling.BILINEAR)
             for tile in tiles]
    strip = Image.new("RGB", (sum(tile.width for tile in tiles) + STRIP_GAP * (len(tiles) - 1), height), (24, 24, 24))
    left = 0
    for tile in tiles:
        strip.paste(tile, (left, 0))
        left += tile.width + STRIP_GAP
    buffer = BytesIO()
    strip.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _prompt_server() -> Any:
    """ComfyUI's PromptServer, or None (in-process engines have none)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def require_same_node_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume a run with node-only settings (width, height, reward_decode) other than its own.

    Raises:
        ValueError: "<setting>: ..." naming the first setting that differs, with the run's value.
    """
    path = run_dir / "comfyui.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"resume: {path} is missing or unreadable ({error}); start a new run (resume off)") from None
    for name, value in settings.items():
        if name in recorded and recorded[name] != value:
            raise ValueError(f"{name}: the run {run_dir.name} was trained with {name} {recorded[name]!r}, not "
                             f"{value!r}; resume with {recorded[name]!r}, or turn resume off to start a new run")


class SFGRPOTrainLoRA(io.ComfyNode):
    """Fine-tune a LoRA with Stepwise-Flow-GRPO; outputs the model with the LoRA applied, ready for KSampler."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOTrainLoRA", display_name="Stepwise-Flow-GRPO Train LoRA", category=f"{CATEGORY}/training",
            description="Trains a LoRA on a flow-matching model with reinforcement learning: each iteration samples "
                        "groups of images per prompt with an SDE, scores them with the reward (stepwise: every "
                        "step's clean estimate too), and updates the LoRA with the clipped GRPO loss. Cancel stops "
                        "it within one model call; the last checkpoint stays and resume continues from it.",
            not_idempotent=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching model to fine-tune (SD3/SD3.5, FLUX, the mini "
                                                "world). Its weights are not changed; the output model carries the "
                                                "LoRA."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the model's latents, for the reward."),
                Prompts.Input("prompts", tooltip="Training prompts (from the Prompts node); each iteration draws "
                                                 "groups_per_iteration of them."),
                Reward.Input("reward", tooltip="The reward to maximise (from Load Reward)."),
                io.String.Input("run_name", default="sfgrpo_lora",
                                tooltip=f"Run folder output/{RUNS_FOLDER}/<run_name>_NNNNN (a new number each "
                                        f"run) and LoRA file loras/{RUNS_FOLDER}/<run_name>_NNNNN.safetensors."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the newest run of this run_name from its last checkpoint (up to "
                                         "iterations); the other settings must be the ones it started with."),
                io.Int.Input("width", default=512, min=16, max=4096, step=16,
                             tooltip="Image width of the training samples (a multiple of 16)."),
                io.Int.Input("height", default=512, min=16, max=4096, step=16,
                             tooltip="Image height of the training samples (a multiple of 16)."),
                *[config_input(section, name, default=default, widget_id=widget)
                  for widget, section, name, default in SETTINGS],
                *[config_input(section, name, default=default, widget_id=widget, optional=True)
                  for widget, section, name, default in OPTIONAL_SETTINGS],
                io.Combo.Input("reward_decode", options=list(REWARD_DECODE), default="auto", optional=True,
                               tooltip="How images are decoded for the reward: 'auto' in bfloat16 autocast where "
                                       "the VAE's device runs bfloat16 natively and faster (CUDA, CPUs with "
                                       "AVX512-BF16 or AMX), otherwise as 'vae dtype'; 'vae dtype' exactly as "
                                       "ComfyUI decodes; 'bfloat16 autocast' always (on a CPU without native "
                                       "bfloat16 several times slower). Pixels differ by ~3/255."),
                *[config_input(section, name, default=default, widget_id=widget, optional=True)
                  for widget, section, name, default in TRAILING_SETTINGS],
                Prompts.Input("eval_prompts", optional=True,
                              tooltip="Held-out prompts: the ODE sampler's mean reward on them is logged every "
                                      "eval_every iterations. Not connected: no evaluation."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied "
                                                              "(strength 1), for KSampler."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA in ComfyUI's native format, for Save "
                                                                 "LoRA Weights or Load LoRA Model."),
                io.LossMap.Output(display_name="metrics", tooltip="Per-iteration loss, reward_mean, approx_kl, ... "
                                                                  "(for Plot Loss Graph)."),
                io.Image.Output(display_name="reward_curve", tooltip="Train (and held-out) reward per iteration."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA's name in the Load LoRA list."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, prompts, reward, run_name, resume, width, height, reward_decode="auto",
                eval_prompts=None, **settings) -> io.NodeOutput:
        import comfy.sd

        check_inputs(model, vae, prompts, reward, width, height)
        run_dir = run_folder(runs_root(), run_name, resume)
        shift = float(getattr(patched_model_sampling(model), "shift", 1.0))
        flow = ComfyFlowModel(model, vae, merge_prompts(prompts, eval_prompts), width=width, height=height,
                              default_prompts=prompts.texts,
                              default_eval_prompts=eval_prompts.texts if eval_prompts else (),
                              decode_autocast=decode_autocast(reward_decode, vae))
        config = build_config(settings, reward=reward, prompts=prompts, eval_prompts=eval_prompts, run_dir=run_dir,
                              device=str(flow.device), shift=shift)
        lora_name = f"{RUNS_FOLDER}/{run_dir.name}.safetensors"
        # What the run's config.json cannot hold: the node-only settings, for whoever resumes or reproduces it. A
        # resume must match them (checked before anything is written); the file keeps the run's first record.
        node_settings = {"width": width, "height": height, "reward_decode": reward_decode}
        if resume:
            require_same_node_settings(run_dir, node_settings)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "comfyui.json",
                              json.dumps({**node_settings, "lora_name": lora_name}, indent=2) + "\n")
        checkpoint = latest_checkpoint(run_dir) if resume else None
        start = checkpoint_iteration(checkpoint) if checkpoint is not None else 0
        progress = TrainingProgress(model, flow.decode, config.sampler.steps, config.train.iterations, start,
                                    cls.hidden.unique_id if cls.hidden else None)
        hooks = TrainHooks(on_rollout_step=progress.on_rollout_step, on_iteration=progress.on_iteration)
        with on_compute_device(reward), trainable(flow):  # the reward first: its memory is freed before the model's
            result = train(config, model=flow, reward=reward.reward, resume=resume, hooks=hooks)
        # The run's own ComfyUI file (ComfyFlowModel.export_lora) goes into the loras folder byte for byte, and the
        # LORA_MODEL and MODEL outputs are read back from it: one conversion, one LoRA everywhere.
        lora_file = loras_root() / lora_name
        atomic_write_bytes(lora_file, (result.run_dir / COMFYUI_LORA_FILE).read_bytes())
        native = load_file(str(lora_file))
        trained_model, _ = comfy.sd.load_lora_for_models(model, None, native, 1.0, 0)
        return io.NodeOutput(trained_model, native, loss_map(result.records), image_tensor(result.reward_curve),
                             lora_name,
                             ui=ui.PreviewText(summary(result.records, result.run_dir, lora_name)))


NODES = [SFGRPOTrainLoRA]
