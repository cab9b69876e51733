"""Packaging for ComfyUI users: the Comfy registry's own validator accepts the pack."""

import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMFY_CLI = ROOT / ".cache" / "comfy-cli" / "bin" / "comfy"  # make install puts comfy-cli there


def test_comfy_node_validate_passes():
    assert COMFY_CLI.is_file(), f"{COMFY_CLI} is missing: make install sets up comfy-cli (python -m venv + pip)"
    result = subprocess.run([str(COMFY_CLI), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output and "Warning" not in output, output


PROVIDED_BY_COMFYUI = {"torch", "torchvision", "torchaudio", "comfyui-frontend-package"}


def _requirement_names(lines) -> dict[str, str]:
    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {requirement.name.lower(): str(requirement.specifier) for requirement in requirements}


def test_requirements_txt_is_the_dependencies_without_what_comfyui_provides():
    """ComfyUI-Manager installs requirements.txt into ComfyUI's own Python: it must never name torch."""
    import tomllib

    listed = _requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    declared = _requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert not PROVIDED_BY_COMFYUI & set(listed), listed
    assert listed == {name: spec for name, spec in declared.items() if name not in PROVIDED_BY_COMFYUI}


def _torch_floor() -> str:
    import tomllib
    from packaging.requirements import Requirement

    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == "torch":
            (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            return floor
    raise AssertionError("pyproject.toml declares no torch floor")


def _pulled_in_by(report: dict, names: set[str]) -> list[str]:
    """The planned packages whose requirements name one of ``names`` (what made pip plan them)."""
    from packaging.requirements import Requirement

    culprits = []
    for item in report["install"]:
        for line in item["metadata"].get("requires_dist") or []:
            requirement = Requirement(line)
            if requirement.name.lower() in names and (requirement.marker is None
                                                      or requirement.marker.evaluate({"extra": ""})):
                culprits.append(f"{item['metadata']['name']} {item['metadata']['version']} requires {line}")
    return culprits


@pytest.mark.slow  # a subprocess or an install: left out by make test-fast
@pytest.mark.parametrize("torch_version", ["floor", "installed"])
def test_installing_requirements_txt_keeps_the_installed_torch(tmp_path, torch_version):
    """pip, asked to install requirements.txt into a Python whose torch is the oldest pyproject.toml admits (the
    floor ComfyUI 0.3.75 needs) or today's, plans nothing for torch, torchvision or torchaudio (live registries)."""
    import json
    import sys

    import torch

    version = _torch_floor() if torch_version == "floor" else torch.__version__.split("+")[0]
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    python = tmp_path / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    installed = pathlib.Path(site) / f"torch-{version}.dist-info"  # what pip reads of an installed torch: metadata
    installed.mkdir()
    (installed / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (installed / "INSTALLER").write_text("pip\n")
    (installed / "RECORD").write_text("")
    report_path = tmp_path / "report.json"
    result = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report_path),
                             "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    planned = {item["metadata"]["name"].lower() for item in report["install"]}
    assert "peft" in planned, planned
    assert not PROVIDED_BY_COMFYUI & planned, (
        f"with torch {version} installed pip plans {sorted(PROVIDED_BY_COMFYUI & planned)}, pulled in by: "
        + "; ".join(_pulled_in_by(report, PROVIDED_BY_COMFYUI)))


@pytest.mark.slow
def test_the_wheel_runs_its_shipped_configs_and_the_demo_outside_the_checkout(tmp_path):
    """The wheel carries the configs, the example workflows and the ComfyUI pack: installed into a fresh venv (its
    dependencies from this one's site-packages, torch included), `sfgrpo config miniworld` resolves the shipped
    config by name and `sfgrpo demo` finds its workflow and the pack, from a folder that is not the checkout."""
    import shutil
    import sys
    import sysconfig

    source = tmp_path / "source"  # the tracked and new files only: no stale build/ of an earlier wheel
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("stepwise_flow_grpo-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch, peft, ...) from this environment, after the venv's own packages.
    (pathlib.Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site,
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        return subprocess.run([str(python), "-m", "sfgrpo_core.cli", *args], cwd=elsewhere, capture_output=True,
                              text=True, timeout=600)

    located = subprocess.run([str(python), "-c", "import sfgrpo_core, sfgrpo_core.shipped as s; "
                              "from sfgrpo_core.headless.demo import TRAIN_WORKFLOW as w; "
                              "print(sfgrpo_core.__file__, s.in_checkout(), w.is_file(), "
                              "all(p.exists() for p in s.pack_files().values()))"],
                             cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert located.returncode == 0, located.stderr[-3000:]
    module, in_checkout, workflow, pack = located.stdout.split()
    assert module.startswith(site) and (in_checkout, workflow, pack) == ("False", "True", "True"), located.stdout
    shown = run("config", "miniworld")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "reward: mini_geneval" in shown.stdout and "output_dir: runs/miniworld" in shown.stdout
    assert run("config", "miniworld_pickscore").stdout.count("mini_pickscore") >= 1
    unknown = run("config", "no_such_recipe")
    assert unknown.returncode == 2 and "shipped: miniworld" in unknown.stderr, unknown.stderr
    demo = run("demo", "--help")
    assert demo.returncode == 0 and "--out" in demo.stdout, demo.stderr[-3000:]
    # The demo's server: ComfyUI loads the pack from the installed wheel, nodes and example workflows.
    served = subprocess.run([str(python), "-c", SERVE_FROM_THE_WHEEL, str(tmp_path / "comfy")], cwd=elsewhere,
                            capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-3000:]
    nodes, templates = json.loads(served.stdout.splitlines()[-1])
    assert {"SFGRPOTrainLoRA", "SFGRPOSampler"} <= set(nodes), nodes
    assert "train_lora" in templates, templates


SERVE_FROM_THE_WHEEL = """
import json, sys, urllib.request
from sfgrpo_core.headless.server import ComfyServer
with ComfyServer(sys.argv[1]) as server:
    nodes = json.load(urllib.request.urlopen(server.url + "/object_info", timeout=60))
    templates = json.load(urllib.request.urlopen(server.url + "/workflow_templates", timeout=60))
print(json.dumps([sorted(name for name in nodes if name.startswith("SFGRPO")), templates.get("sfgrpo", [])]))
"""
