"""Packaging for ComfyUI users: the Comfy registry's own validator accepts the pack."""

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
