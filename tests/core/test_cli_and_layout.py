"""The console script, and the layout rules: sfgrpo_core never imports comfy and never unpickles."""

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sfgrpo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


@pytest.mark.slow  # a subprocess or an install: left out by make test-fast
def test_train_then_resume_then_diagnose_from_the_command_line(toy_base_path, tmp_path):
    run = tmp_path / "run"
    common = ["configs/toy.yaml", "--model.path", str(toy_base_path), "--train.output_dir", str(run)]
    first = _sfgrpo("train", *common, "--train.iterations", "3", "--train.eval_every", "2")
    assert first.returncode == 0, first.stderr
    assert "held-out reward" in first.stdout and (run / "lora.safetensors").is_file()
    assert "sfgrpo train" in first.stderr  # the progress bar
    again = _sfgrpo("train", *common, "--train.iterations", "4", "--train.eval_every", "2")
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = _sfgrpo("train", *common, "--train.iterations", "4", "--train.eval_every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    iterations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [0, 1, 2, 3, 4]  # four training records and the final evaluation
    checked = _sfgrpo("diagnose", *common)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASS") == 5 and "PASS  finite_update" in checked.stdout


@pytest.mark.slow  # a subprocess or an install: left out by make test-fast
def test_config_command_and_flag_errors():
    shown = _sfgrpo("config", "configs/toy.yaml", "--train.group_size", "4")
    assert shown.returncode == 0
    assert yaml.safe_load(shown.stdout)["train"]["group_size"] == 4
    bad = _sfgrpo("train", "configs/toy.yaml", "--train.group_size", "1")
    assert bad.returncode == 2 and "train.group_size: must be >= 2" in bad.stderr
    assert "Traceback" not in bad.stderr
    typo = _sfgrpo("train", "--sampler.sde", "euler")
    assert typo.returncode == 2 and "sampler.sde: 'euler' is not one of" in typo.stderr


def test_help_shows_field_help():
    shown = _sfgrpo("train", "--help")
    assert "--credit.substeps" in shown.stdout and "Tweedie" in shown.stdout


def test_core_imports_and_trains_without_comfy():
    code = (
        "import sys, pkgutil, importlib, sfgrpo_core\n"
        "for module in pkgutil.walk_packages(sfgrpo_core.__path__, 'sfgrpo_core.'):\n"
        "    importlib.import_module(module.name)\n"
        "assert not any(name == 'comfy' or name.startswith('comfy.') for name in sys.modules), 'comfy imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_no_comfy_imports_pickles_or_eval_in_the_core():
    import re

    # torch.load only as torch's restricted unpickler (weights_only=True, on the call's line): tensors, no code.
    forbidden = re.compile(r"^\s*(import|from) comfy|torch\.load\((?![^\n]*weights_only=True)|import pickle|"
                           r"pickle\.loads?\(|(?<![.\w])(eval|exec)\(", re.MULTILINE)
    for path in (ROOT / "sfgrpo_core").rglob("*.py"):
        match = forbidden.search(path.read_text())
        assert match is None, f"{path.relative_to(ROOT)} contains {match.group(0)!r}"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(relative level, module) of every import statement in ``path``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_the_algorithm_imports_torch_and_nothing_else_of_the_project():
    allowed = {"torch", "math", "functools", "dataclasses", "collections", "typing", "__future__"}
    for path in (ROOT / "sfgrpo_core" / "algorithm").glob("*.py"):
        for level, module in _imports(path):
            if level:
                assert level == 1, f"{path.name} imports {'.' * level}{module}: the algorithm imports nothing else"
            else:
                assert module.split(".")[0] in allowed, f"{path.name} imports {module}"


def test_the_library_never_imports_the_headless_comfyui_tooling():
    """sfgrpo_core/headless/ (server manager, runner, workflow format, demo) is for the CLI only."""
    for path in (ROOT / "sfgrpo_core").rglob("*.py"):
        if "headless" in path.parts or path.name == "cli.py":
            continue
        for _, module in _imports(path):
            assert "headless" not in module.split("."), f"{path.relative_to(ROOT)} imports {module}"
    code = ("import sys, sfgrpo_core.training.trainer, sfgrpo_core.models, sfgrpo_core.rewards\n"
            "print(sorted(name for name in sys.modules if name.startswith('sfgrpo_core.headless')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_top_level_of_the_library_stays_small():
    modules = sorted(path.name for path in (ROOT / "sfgrpo_core").glob("*.py"))
    assert len(modules) <= 8, modules


def test_the_headless_tooling_finds_the_pack_and_the_demo_workflow():
    """The headless tools locate files relative to their own module: a move of the module must not break them."""
    from sfgrpo_core.headless.demo import TRAIN_WORKFLOW
    from sfgrpo_core.shipped import in_checkout, pack_files

    assert TRAIN_WORKFLOW.is_file() and json.loads(TRAIN_WORKFLOW.read_text())
    assert in_checkout() and pack_files() == {name: ROOT / name for name in ("__init__.py", "nodes", "web",
                                                                              "workflows", "sfgrpo_core")}
