"""The ``sfgrpo`` command line: train, diagnose, and show the config fields.

Every config field is also a flag (``--train.group_size 16``), built from the same dataclass fields as config
files and the ComfyUI widgets, with the same help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

from .config import SECTIONS, Config, ConfigError, coerce, config_from_dict, field_type, load_config
from .shipped import config_path


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, section_type in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings (override the config file)")
        for spec in dataclasses.fields(section_type):
            choices = spec.metadata.get("choices")
            group.add_argument(f"--{section}.{spec.name}", dest=f"{section}.{spec.name}", default=None,
                               metavar=spec.name.upper(),
                               help=f"{spec.metadata['help']} (default: {spec.default!r}"
                                    + (f"; one of {', '.join(choices)})" if choices else ")"))


def _config_from_args(args: argparse.Namespace) -> Config:
    try:
        config = load_config(config_path(args.config)) if args.config else Config()
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    data = config.to_dict()
    for section, section_type in SECTIONS.items():
        for spec in dataclasses.fields(section_type):
            value = getattr(args, f"{section}.{spec.name}")
            if value is not None:
                data[section][spec.name] = coerce(f"{section}.{spec.name}", value, field_type(section_type, spec.name))
    return config_from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfgrpo", description="Stepwise-Flow-GRPO fine-tuning of flow models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a LoRA as configured")
    train.add_argument("config", nargs="?", help="YAML or JSON config file (sections: " + ", ".join(SECTIONS) + ")")
    train.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its latest "
                                                             "checkpoint")
    train.add_argument("--processes", type=int, default=1,
                       help="train with this many processes on this machine (one per GPU; gloo on CPU): shorthand "
                            "for accelerate launch --multi_gpu --num_processes N -m sfgrpo_core.cli train ...")
    _add_config_flags(train)
    diagnose = commands.add_parser("diagnose", help="check on-policy ratio, log-prob parity, the ODE sampler, and "
                                                    "where a NaN is made")
    diagnose.add_argument("config", nargs="?", help="YAML or JSON config file")
    _add_config_flags(diagnose)
    show = commands.add_parser("config", help="print the resolved config (defaults + file + flags) as YAML")
    show.add_argument("config", nargs="?", help="YAML or JSON config file")
    _add_config_flags(show)
    from .headless.demo import add_demo_arguments
    from .headless.runner import add_run_arguments

    run = commands.add_parser("run", help="run an API-format ComfyUI workflow headless and download its outputs")
    add_run_arguments(run)
    demo = commands.add_parser("demo", help="train a LoRA on the mini world through a headless ComfyUI (make demo)")
    add_demo_arguments(demo)
    bench = commands.add_parser("bench", help="benchmarks (resumable; results are written, never asserted)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    from .bench.memory import add_arguments as add_memory_arguments
    from .bench.paper import add_arguments as add_paper_arguments
    from .bench.signal import add_arguments as add_signal_arguments
    from .bench.speed import add_arguments as add_speed_arguments

    add_paper_arguments(bench_commands.add_parser(
        "paper", help="Flow-GRPO vs Stepwise-Flow-GRPO and ablations on the mini world, several seeds (hours; "
                      "--quick: minutes)"))
    add_speed_arguments(bench_commands.add_parser(
        "speed", help="cost of a Stepwise iteration next to a Flow-GRPO one, by phase, and the loop's overhead"))
    add_memory_arguments(bench_commands.add_parser(
        "memory", help="peak memory of an iteration as groups grow, chunked and not"))
    add_signal_arguments(bench_commands.add_parser(
        "signal", help="how much per-step signal the step rewards carry: each step's share of a group's reward "
                       "spread, and whether the intermediate estimates' rewards behave like a value estimate"))
    commands.add_parser("rewards", help="list the registered rewards (built-in and installed plug-ins) with their "
                                        "options")
    server = commands.add_parser("reward-server", help="serve a registered reward over HTTP (JSON + PNG) for the "
                                                       "'remote' reward, e.g. from an environment of its own")
    server.add_argument("--reward", required=True, help="the registered reward to serve (see: sfgrpo rewards)")
    server.add_argument("--options", default="{}", help="the reward's keyword options as a JSON object")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    server.add_argument("--port", type=int, default=8790, help="port to listen on")
    miniworld = commands.add_parser("miniworld", help="the mini world (a self-made SD3 in miniature)")
    miniworld_commands = miniworld.add_subparsers(dest="miniworld_command", required=True)
    build = miniworld_commands.add_parser("build", help="rebuild the mini world's weights and manifest (~25 min on "
                                                        "2 cores)")
    build.add_argument("--out", default=None, help="output folder (default: the committed weights folder)")
    build.add_argument("--pickscore", action="store_true",
                       help="build only the mini_pickscore reward from the committed mini world (~20 min on one "
                            "thread; default --out: miniworld/reward_weights)")
    build.add_argument("--quick", action="store_true",
                       help="with --pickscore and --out: a throwaway reward in seconds (checks the build)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    command = f"bench {args.bench_command}" if args.command == "bench" else args.command
    return COMMANDS[command](args)


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command handler imported only when its command runs (``sfgrpo --help`` stays light)."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module, __package__), function)(args)

    return handler


def _with_config(run: Callable[[argparse.Namespace, Config], int]) -> Callable[[argparse.Namespace], int]:
    """A handler of a command that reads a config (file or shipped name, then flags): a bad one exits with 2."""

    def handler(args: argparse.Namespace) -> int:
        try:
            config = _config_from_args(args)
        except ConfigError as error:
            print(f"sfgrpo: config error: {error}", file=sys.stderr)
            return 2
        return run(args, config)

    return handler


def _show_config(args: argparse.Namespace, config: Config) -> int:
    import yaml

    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _diagnose(args: argparse.Namespace, config: Config) -> int:
    from .training.diagnose import diagnose

    checks = diagnose(config)
    for check in checks:
        print(check.line())
    return 0 if all(check.passed for check in checks) else 1


def _train(args: argparse.Namespace) -> int:
    if args.processes != 1:
        return _launch(args.processes, args.argv)
    return _with_config(_train_with)(args)


def _train_with(args: argparse.Namespace, config: Config) -> int:
    from .rewards import RewardError, RewardInputError
    from .training.distributed import TeamError
    from .training.trainer import NonFiniteError, train

    try:
        result = train(config, resume=args.resume, progress=True)
    except TeamError as error:
        print(f"sfgrpo: {error}", file=sys.stderr, flush=True)
        # The process group is broken (a peer died): tearing it down at interpreter exit aborts in gloo's C++
        # threads ("terminate called without an active exception"). Files are written atomically: leave now.
        os._exit(1)
    except (RewardError, RewardInputError, NonFiniteError) as error:
        print(f"sfgrpo: {error}", file=sys.stderr)
        return 1
    except ConfigError as error:
        print(f"sfgrpo: config error: {error}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    if os.environ.get("RANK", "0") == "0":  # several processes: the main one reports
        evaluations = [r["eval_reward_mean"] for r in result.records if r.get("eval_reward_mean") is not None]
        if len(evaluations) >= 2:
            print(f"held-out reward {evaluations[0]:.4f} -> {evaluations[-1]:.4f}")
        print(f"LoRA: {result.lora_path}\nmetrics: {result.run_dir / 'metrics.jsonl'}\n"
              f"reward curve: {result.run_dir / 'reward_curve.png'}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Even after the process group is destroyed, gloo's threads (kept alive by FSDP's and DTensor's objects)
        # can abort the interpreter's shutdown ("terminate called without an active exception", 1 run in 3 with
        # train.sharding fsdp here). Everything is written (atomically) and closed: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _leave_process_group() -> None:
    """Close the process group of a multi-process run that ended normally (every process reaches this)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _launch(processes: int, argv: list[str]) -> int:
    """``sfgrpo train --processes N ...``: the same command under accelerate's launcher (torchrun underneath)."""
    if processes < 1:
        print(f"sfgrpo train: --processes: must be >= 1, got {processes}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" in os.environ:
        print("sfgrpo train: --processes inside a launched process; drop it (the launcher already started "
              f"{os.environ['WORLD_SIZE']})", file=sys.stderr)
        return 2
    rest, skip = [], False
    for arg in argv:  # drop --processes N / --processes=N
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            rest.append(arg)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sfgrpo_core.cli",
               *rest]
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        print("sfgrpo train: --processes needs accelerate: pip install 'stepwise-flow-grpo[distributed]'",
              file=sys.stderr)
        return 2
    return subprocess.run(command, check=False).returncode


def _rewards(args: argparse.Namespace) -> int:
    from . import rewards
    from .finite_json import loads_finite

    if args.command == "rewards":
        for name in rewards.available():
            print(rewards.describe(name))
        return 0
    from .rewards.remote import RewardServer

    try:
        options = loads_finite(args.options)
        if not isinstance(options, dict):
            raise ValueError("expected a JSON object")
        server = RewardServer(args.reward, options, host=args.host, port=args.port)
    except ValueError as error:
        print(f"sfgrpo reward-server: --reward/--options: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"sfgrpo reward-server: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    print(f"serving reward {args.reward!r} at {server.url} (POST /score, GET /info); Ctrl+C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _miniworld(args: argparse.Namespace) -> int:
    import json

    if args.quick and not args.pickscore:
        print("sfgrpo miniworld build: --quick needs --pickscore", file=sys.stderr)
        return 2
    if args.pickscore:
        from .miniworld import pickscore

        if args.quick and args.out is None:
            print("sfgrpo miniworld build: --quick needs --out DIR (it would overwrite the committed reward)",
                  file=sys.stderr)
            return 2
        settings = pickscore.QUICK if args.quick else pickscore.PickScoreSettings()
        reward_manifest = pickscore.build_pickscore(args.out or pickscore.REWARD_WEIGHTS_DIR, settings)
        print(json.dumps({key: reward_manifest[key] for key in ("seconds", "quality", "file")}, indent=2))
        return 0
    from .miniworld.build import WEIGHTS_DIR, build

    manifest = build(args.out or WEIGHTS_DIR)
    summary = {key: manifest[key] for key in ("seconds", "autoencoder", "minigeneval_heldout")}
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "diagnose": _with_config(_diagnose),
    "config": _with_config(_show_config),
    "run": _lazy(".headless.runner", "run_from_args"),
    "demo": _lazy(".headless.demo", "demo_from_args"),
    "rewards": _rewards,
    "reward-server": _rewards,
    "miniworld": _miniworld,
    "bench paper": _lazy(".bench.paper", "run_from_args"),
    "bench speed": _lazy(".bench.speed", "run_from_args"),
    "bench memory": _lazy(".bench.memory", "run_from_args"),
    "bench signal": _lazy(".bench.signal", "run_from_args"),
}
"""Each command's handler: args -> exit status (0 done, 1 failed, 2 bad input)."""


if __name__ == "__main__":
    sys.exit(main())
