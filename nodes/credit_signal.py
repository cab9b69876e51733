"""Credit Signal (SFGRPOCreditSignal): ``sfgrpo bench signal`` in the graph. Before paying Stepwise's extra cost on a
model, it measures whether per-step credit is informative there: rollouts of the model with every state's clean
completion scored, each state's value from SDE continuations, and per step how well Stepwise's gains and Flow-GRPO's
final reward line up with the true per-step gains (sfgrpo_core.bench.signal, docs/results.md)."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..sfgrpo_core.bench.signal import measure_session, progress_ticks, signal_figure, table, verdict
from ..sfgrpo_core.config import config_from_dict
from ..sfgrpo_core.training.metrics import json_safe
from .comfy_model import ComfyFlowModel, patched_model_sampling, trainable
from .rewards import on_compute_device
from .train import check_inputs, decode_autocast, runs_root
from .types import CATEGORY, Prompts, Reward, image_tensor
from .widgets import config_input

# (widget id, config section, config field, node default or None for the config's own default)
SETTINGS = (
    ("sde", "sampler", "sde", None),
    ("eta", "sampler", "eta", None),
    ("noise_level", "sampler", "noise_level", None),
    ("steps", "sampler", "steps", None),
    ("substeps", "credit", "substeps", None),
    ("group_size", "train", "group_size", None),
    ("groups", "train", "groups_per_iteration", None),
    ("seed", "train", "seed", None),
)


class SFGRPOCreditSignal(io.ComfyNode):
    """Whether Stepwise-Flow-GRPO's per-step credit is informative for this model, reward and prompts."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SFGRPOCreditSignal", display_name="Stepwise-Flow-GRPO Credit Signal", category=CATEGORY,
            description="Before training: samples the model's training rollouts (no training), scores every "
                        "state's clean completion and estimates each state's value from SDE continuations, then "
                        "says per step how much of the outcome's variance it carries and how well Stepwise's "
                        "gains and Flow-GRPO's final reward line up with what the step really contributed. If "
                        "Stepwise's are not the better aligned where the variance is, its extra cost buys nothing "
                        "there: train with Flow-GRPO.",
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching MODEL you would train (SD3/SD3.5, FLUX, the "
                                                "mini world)."),
                io.Vae.Input("vae", tooltip="Its VAE (the reward scores decoded images)."),
                Prompts.Input("prompts", tooltip="Training prompts, from a Prompts node."),
                Reward.Input("reward", tooltip="The reward you would train on, from Load Reward."),
                io.Int.Input("width", default=512, min=16, max=4096, step=16,
                             tooltip="Image width of the rollouts (a multiple of 16)."),
                io.Int.Input("height", default=512, min=16, max=4096, step=16,
                             tooltip="Image height of the rollouts (a multiple of 16)."),
                *[config_input(section, name, default=default, widget_id=widget)
                  for widget, section, name, default in SETTINGS],
                io.Int.Input("batches", default=2, min=1, max=64,
                             tooltip="Iterations' worth of rollouts (groups x group_size trajectories each) to "
                                     "pool; more make the correlations steadier (their error is about "
                                     "1/sqrt(trajectories))."),
                io.Int.Input("continuations", default=8, min=1, max=64,
                             tooltip="SDE continuations per state whose mean final reward estimates the state's "
                                     "value (costs about continuations x steps / 2 rollouts per batch)."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="Per trained step: the share of the outcome's "
                                                             "variance (bars) and each credit's alignment with the "
                                                             "true per-step gains (lines)."),
                io.String.Output(display_name="numbers", tooltip="The measurement as JSON (sfgrpo bench signal's "
                                                                 "record)."),
                io.String.Output(display_name="verdict", tooltip="One line: is Stepwise likely to pay here?"),
            ],
        )

    @classmethod
    def execute(cls, model, vae, prompts, reward, width, height, batches, continuations, **settings) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        check_inputs(model, vae, prompts, reward, width, height)
        flow = ComfyFlowModel(model, vae, prompts, width=width, height=height, default_prompts=prompts.texts,
                              decode_autocast=decode_autocast("auto", vae))
        data: dict = {"model": {"name": "comfyui", "device": str(flow.device)}, "credit": {"method": "stepwise"}}
        for widget, section, name, _ in SETTINGS:
            data.setdefault(section, {})[name] = settings[widget]
        data["sampler"]["shift"] = float(getattr(patched_model_sampling(model), "shift", 1.0))
        data["train"].update(reward=reward.name, reward_options=reward.options_json, prompts=list(prompts.texts),
                             eval_every=0, output_dir=str(runs_root() / "credit_signal"))
        config = config_from_dict(data)
        bar = comfy.utils.ProgressBar(progress_ticks(batches, config.sampler.steps, continuations))

        def tick() -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)

        from ..sfgrpo_core.training.trainer import build_session

        with on_compute_device(reward), trainable(flow):  # trainable: the session's LoRA is removed afterwards
            session = build_session(config, model=flow, reward=reward.reward)
            result = measure_session(session, batches, continuations, on_progress=tick)
        line = verdict(result)
        return io.NodeOutput(image_tensor(signal_figure(result)), json.dumps(json_safe(result), indent=1), line,
                             ui=ui.PreviewText(f"{line}\n\n{table(result)}"))


NODES = [SFGRPOCreditSignal]
