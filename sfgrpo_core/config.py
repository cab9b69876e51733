"""Training configuration: frozen dataclasses whose fields carry their help text, choices and bounds.

The CLI (``sfgrpo train --train.group_size 16``), config files (YAML/JSON, one mapping per section) and the
ComfyUI node widgets are all built from these fields, so defaults and tooltips live here and only here.
Defaults follow Flow-GRPO / Stepwise-Flow-GRPO (docs/algorithm.md section 7) unless the field says "(ours)".
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .algorithm.sde import SDE_NAMES
from .finite_json import NonFiniteJSONError, loads_finite

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.field``) and what to change."""


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None) -> Any:
    """A dataclass field with help text and validation bounds in its metadata."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple for sequence defaults; configs are immutable")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    name: str = option("toy", "Model backend, from sfgrpo_core.models.available(): 'toy' (the 2-D toy world), "
                              "'miniworld' (the committed tiny SD3 of shapes) or 'diffusers' (a local SD3/SD3.5/FLUX "
                              "pipeline folder in model.path).")
    path: str = option("", "Weights for the backend (a file or folder). Empty: the backend's built-in default "
                           "(the toy world pretrains its base model deterministically in seconds).")
    device: str = option("cpu", "Torch device for the model and the SDE math, e.g. 'cpu' or 'cuda'.")
    options: str = option("{}", "JSON object of backend options, e.g. '{\"dtype\": \"bfloat16\", \"latent_size\": "
                                "[64, 64]}' for the diffusers backend (see its factory's arguments).")


@dataclass(frozen=True)
class SamplerConfig:
    sde: str = option("ddim", "Rollout sampler: 'ddim' (the paper's DDIM-inspired SDE, a few-step sampler that "
                              "becomes under-dispersed with many steps), 'flow_grpo' (Flow-GRPO's SDE), 'cps' "
                              "(flow_grpo's coefficient-preserving sampler) or 'ode' (deterministic; cannot train).",
                      choices=SDE_NAMES)
    eta: float = option(0.7, "Noise strength of the 'ddim' and 'cps' samplers: sigma_t = eta * s * sqrt(1 - t) "
                             "for ddim. Not published; 0.7 is ours.", minimum=0.0, maximum=1.0)
    noise_level: float = option(0.7, "Noise level a of the 'flow_grpo' SDE: std_t = a * sqrt(t / (1 - t)).",
                                minimum=0.0, maximum=2.0)
    steps: int = option(10, "Denoising steps T of each training rollout (Flow-GRPO trains with 10).", minimum=1,
                        maximum=1000)
    shift: float = option(3.0, "SD3 time shift of the sigma grid (3.0 for SD3/SD3.5 at 1024 px).", minimum=0.01,
                          maximum=100.0)
    min_train_std: float = option(1e-4, "Transitions whose noise std is below this are left out of the loss. 1e-4 "
                                        "only drops deterministic steps; on few-element samples (the mini world) the "
                                        "ddim step into the last sigma (std ~0.005) dominates the ratio and "
                                        "destabilises training, and 0.02 drops it (ours).", minimum=0.0)
    train_last_step: bool = option(False, "Also train the last step (sigma ~0.009 -> 0). Flow-GRPO skips it: its "
                                          "noise is tiny and its log-prob ill-conditioned.")


@dataclass(frozen=True)
class CreditConfig:
    method: str = option("stepwise", "'stepwise' (Stepwise-Flow-GRPO: each step's advantage from its own reward "
                                     "gain) or 'flow_grpo' (every step gets the final reward's advantage).",
                         choices=("stepwise", "flow_grpo"))
    substeps: int = option(5, "T': Euler ODE substeps that complete each intermediate state to a clean estimate "
                              "before it is rewarded. 1 = the one-step Tweedie estimate; the paper finds 5 robust.",
                           minimum=1, maximum=100)
    completion: str = option("uniform", "How each intermediate state is completed to a clean estimate: 'uniform' "
                                        "(the paper's: T' = substeps Euler steps uniform in t) or 'grid' "
                                        "(DenseGRPO's: the ODE over every remaining sampling step; substeps is "
                                        "not used, and state k costs T - k - 1 model calls).",
                             choices=("uniform", "grid"))
    normalization: str = option("joint", "'joint' normalizes gains over all (member, step) pairs of a group (the "
                                         "paper's); 'per_step' normalizes each step on its own (ablation only).",
                                choices=("joint", "per_step"))
    std_scope: str = option("group", "Divide by the std of the 'group' or of the whole batch ('global', like "
                                     "flow_grpo's global_std; ours).", choices=("group", "global"))
    advantage_clip: float = option(5.0, "Advantages are clipped to +-this.", minimum=0.0)
    std_eps: float = option(1e-4, "Added to the std when normalizing advantages.", minimum=0.0)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(3e-4, "AdamW learning rate of the LoRA weights.", minimum=0.0)
    lr_schedule: str = option("constant", "How lr changes over the run: 'constant', or 'cosine' (half a cosine from "
                                          "lr down to lr_final_ratio x lr at the last of train.iterations).",
                              choices=("constant", "cosine"))
    lr_final_ratio: float = option(0.1, "With lr_schedule cosine: the last iteration's lr as a fraction of lr.",
                                   minimum=0.0, maximum=1.0)
    lr_decay_iterations: int = option(0, "With lr_schedule cosine: the iterations the decay spans (lr stays at the "
                                         "floor after them); 0 = train.iterations. Set it when a run will be "
                                         "extended by resuming with more iterations, so its schedule stays put.",
                                      minimum=0)
    weight_decay: float = option(1e-4, "AdamW weight decay.", minimum=0.0)
    grad_clip: float = option(1.0, "Gradient-norm clip per optimizer step (0 disables it).", minimum=0.0)
    clip_range: float = option(1e-4, "PPO clip eps of the importance ratio. 1e-4 is calibrated to log-probs "
                                     "averaged over elements.", minimum=0.0)
    kl_beta: float = option(0.0, "Weight of the KL penalty to the base model (the adapter switched off). On "
                                 "flow_grpo's scale (kl_scale) its SD3 recipes use 0.01 (PickScore) and 0.04 "
                                 "(GenEval, OCR).", minimum=0.0)
    kl_scale: str = option("flow_grpo", "How the KL penalty |mean - mean_ref|^2 / (2 var) is scaled. 'flow_grpo': "
                                        "var = step variance / h (h = t - s, the step size), as flow_grpo's "
                                        "train_sd3.py divides by std_dev_t^2 without h, so its beta values carry "
                                        "over. 'step_variance': var = the step's own variance (1/h times larger: "
                                        "3.7-25x on a 10-step grid; beta_step_variance = beta_flow_grpo * h).",
                           choices=("flow_grpo", "step_variance"))
    skip_zero_advantage: bool = option(False, "Leave transitions whose advantage is exactly 0 (groups whose "
                                              "rewards are all equal) out of the loss and its mean, as flow_grpo "
                                              "drops such samples before its update; they carry no gradient "
                                              "either way, but they dilute the mean of the others.")
    minibatches: int = option(2, "Optimizer steps per iteration: the iteration's transitions are shuffled and "
                                 "split into this many minibatches (Flow-GRPO takes 2).", minimum=1)
    micro_batch_size: int = option(4, "Transitions per forward/backward pass; gradients accumulate within a "
                                      "minibatch (the same update). 4 keeps SD3.5-Medium at 1024 px within a 24 GB "
                                      "GPU: with gradient checkpointing a transition needs ~0.8 GiB for its backward "
                                      "pass, without it 10 GiB (benchmarks/activation_memory.py). 0 = the whole "
                                      "minibatch at once, for small models (the mini world's and toy configs).",
                                   minimum=0)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = option(32, "LoRA rank r.", minimum=1)
    alpha: float = option(64.0, "LoRA alpha (the update is scaled by alpha / rank).", minimum=0.0)
    target_modules: tuple[str, ...] = option((), "Module names that get adapters. Empty: the backend's default "
                                                 "(for SD3/FLUX, the attention projections).")


@dataclass(frozen=True)
class TrainConfig:
    reward: str = option("toy_mode", "Reward, from sfgrpo_core.rewards.available().")
    reward_options: str = option("{}", "JSON object of keyword options for the reward's factory.")
    prompts: tuple[str, ...] = option((), "Training prompts. Empty: the backend's default training prompts.")
    eval_prompts: tuple[str, ...] = option((), "Held-out prompts for evaluation. Empty: the backend's default.")
    initial_noise: str = option("auto", "Initial noise x_1 of a group's members: 'shared' (one draw per group, "
                                        "which Stepwise-Flow-GRPO needs: r_0 is then one reward per group), "
                                        "'independent' (one draw per member, as Flow-GRPO samples), or 'auto' "
                                        "(shared for credit.method stepwise, independent for flow_grpo).",
                                choices=("auto", "shared", "independent"))
    group_size: int = option(8, "Members per prompt group: they share the prompt (and, with shared initial "
                                "noise, the initial noise). GRPO "
                                "compares them, so at least 2 (Flow-GRPO uses 16-24).", minimum=2)
    groups_per_iteration: int = option(4, "Prompt groups sampled per iteration (Flow-GRPO uses 48).", minimum=1)
    iterations: int = option(30, "Sampling iterations (rollout -> rewards -> update) to run in total.", minimum=1)
    seed: int = option(0, "Seed; prompt choice and all noise are derived from (seed, iteration, group, member), "
                          "so a resumed run matches an uninterrupted one.", minimum=0)
    output_dir: str = option("runs/toy", "Run folder: config, metrics.jsonl, checkpoints, the LoRA and plots are "
                                         "written here and nowhere else.")
    checkpoint_every: int = option(10, "Save a checkpoint every this many iterations (and at the end).", minimum=1)
    keep_checkpoints: int = option(2, "How many recent checkpoints to keep.", minimum=1)
    eval_every: int = option(10, "Evaluate held-out reward with the ODE sampler every this many iterations (and "
                                 "before the first and after the last). 0 disables evaluation.", minimum=0)
    eval_samples: int = option(16, "Samples per held-out prompt in each evaluation.", minimum=1)
    eval_steps: int = option(10, "ODE steps of the evaluation sampler.", minimum=1)
    sample_batch_size: int = option(16, "Trajectories per model call in the rollout, the evaluation and the step "
                                        "rewards' completions: peak memory grows with it, not with the number of "
                                        "groups. Results do not depend on it (each member has its own noise). 16 "
                                        "keeps SD3.5-Medium at 1024 px within a 24 GB GPU (~0.25 GiB a sample; "
                                        "benchmarks/activation_memory.py).", minimum=1)
    reward_batch_size: int = option(64, "Images per reward call (and per decode call, which the diffusers backend "
                                        "splits further to fit the free memory).", minimum=1)
    distributed_timeout: float = option(600.0, "Seconds a process waits in a collective (gather, gradient sum) "
                                               "when several processes train (accelerate launch) before it gives up "
                                               "with an error: a process that died never leaves the others hanging.",
                                        minimum=1.0)
    trackers: str = option("none", "Experiment trackers that receive every metrics.jsonl field each iteration, "
                                   "the evaluation images and the config: 'tensorboard' (event files in "
                                   "<output_dir>/tensorboard; pip extra tensorboard), 'wandb' (a run under "
                                   "<output_dir>/wandb, offline unless W&B is logged in or WANDB_MODE says "
                                   "otherwise; pip extra wandb), both, or 'none'.",
                           choices=("none", "tensorboard", "wandb", "tensorboard,wandb"))
    sharding: str = option("auto", "With several processes: 'none' keeps the whole model on every process (DDP, "
                                   "configs/accelerate/ddp.yaml); 'fsdp' shards the model and the LoRA over the "
                                   "processes with torch FSDP2, each transformer block on its own (for models "
                                   "that do not fit one GPU; configs/accelerate/fsdp.yaml); 'auto' takes 'fsdp' "
                                   "when accelerate launches with an FSDP config, else 'none'. One process: none.",
                           choices=("auto", "none", "fsdp"))


SECTIONS: dict[str, type[DataclassInstance]] = {
    "model": ModelConfig,
    "sampler": SamplerConfig,
    "credit": CreditConfig,
    "optim": OptimConfig,
    "lora": LoRAConfig,
    "train": TrainConfig,
}

# Fields a resumed run may change: they extend or re-schedule the run without changing what was learned so far.
RESUMABLE_CHANGES = frozenset({"train.iterations", "train.checkpoint_every", "train.keep_checkpoints",
                               "train.eval_every", "model.device", "train.output_dir",
                               "train.distributed_timeout", "train.sharding", "train.trackers"})


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name, section_type in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, section_type):
                raise ConfigError(f"{name}: expected a {section_type.__name__}, got {type(section).__name__}")
            for spec in dataclasses.fields(section):
                _check_bounds(f"{name}.{spec.name}", getattr(section, spec.name), spec.metadata)
        _json_object("train.reward_options", self.train.reward_options)
        _json_object("model.options", self.model.options)
        if self.sampler.sde == "ode":
            raise ConfigError("sampler.sde: 'ode' has no noise, so it gives no policy gradient; use 'ddim', "
                              "'flow_grpo' or 'cps' for training")

    @property
    def initial_noise(self) -> str:
        """train.initial_noise with 'auto' resolved by the credit method: 'shared' or 'independent'."""
        if self.train.initial_noise != "auto":
            return self.train.initial_noise
        return "shared" if self.credit.method == "stepwise" else "independent"

    @property
    def reward_kwargs(self) -> dict[str, Any]:
        return json.loads(self.train.reward_options)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return json.loads(self.model.options)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **dotted: Any) -> Config:
        """A copy with ``section.field`` values replaced (keys use '__' or '.' between section and field)."""
        data = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.replace("__", ".").partition(".")
            data.setdefault(section, {})[name] = value
        return config_from_dict(data)


def _json_object(path: str, text: str) -> dict[str, Any]:
    try:
        value = loads_finite(text)
    except NonFiniteJSONError as error:
        raise ConfigError(f"{path}: {error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); write e.g. '{{\"key\": 1}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a JSON object such as '{{}}', got {text!r}")
    return value


def _section_to_dict(section: Any) -> dict[str, Any]:
    return {spec.name: _plain(getattr(section, spec.name)) for spec in dataclasses.fields(section)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_bounds(path: str, value: Any, metadata: typing.Mapping[str, Any]) -> None:
    choices, minimum, maximum = metadata.get("choices"), metadata.get("minimum"), metadata.get("maximum")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
    if isinstance(value, float) and not math.isfinite(value):
        # NaN passes every < and > comparison below, and inf every lower bound: say so instead of training on it.
        raise ConfigError(f"{path}: must be a finite number, got {value!r}. {metadata['help']}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum}, got {value!r}. {metadata['help']}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{path}: must be <= {maximum}, got {value!r}. {metadata['help']}")


def field_type(section_type: type, name: str) -> Any:
    """The resolved annotation of ``section_type.name`` (the module uses postponed annotations)."""
    return typing.get_type_hints(section_type)[name]


def coerce(path: str, value: Any, annotation: Any) -> Any:
    """Convert a parsed YAML/JSON/CLI value to the field's type, or raise ConfigError naming ``path``."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation in (int, float):
        expected, accepted = ("an integer", (int, str)) if annotation is int else ("a number", (int, float, str))
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{path}: expected {expected}, got {value!r}")
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(f"{path}: expected {expected}, got {value!r}") from None
    if annotation is str:
        if isinstance(value, dict) and path.endswith("options"):
            return json.dumps(value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected text, got {value!r}")
        return str(value)
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):
            value = [line.strip() for line in value.replace(",", "\n").splitlines() if line.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{path}: unsupported field type {annotation!r}")


def config_from_dict(data: typing.Mapping[str, Any]) -> Config:
    """Build and validate a Config from nested mappings {section: {field: value}}.

    Raises:
        ConfigError: naming the unknown section/field or the invalid value.
    """
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    sections: dict[str, Any] = {}  # section name -> its dataclass; Config.__post_init__ checks each one's type
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section; valid sections are {', '.join(SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, typing.Mapping):
            raise ConfigError(f"{name}: expected a mapping of fields, got {values!r}")
        section_type = SECTIONS[name]
        valid = {spec.name for spec in dataclasses.fields(section_type)}
        kwargs = {}
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"{name}.{key}: unknown field; valid fields are {', '.join(sorted(valid))}")
            kwargs[key] = coerce(f"{name}.{key}", value, field_type(section_type, key))
        sections[name] = section_type(**kwargs)
    return Config(**sections)


def load_config(path: str | Path) -> Config:
    """Read a YAML (.yaml/.yml) or JSON config file; missing sections and fields take their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return config_from_dict(data)


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted names of the fields whose values differ."""
    old_data, new_data = old.to_dict(), new.to_dict()
    return [f"{section}.{name}" for section, values in old_data.items() for name, value in values.items()
            if new_data[section][name] != value]
