"""Packaging for ComfyUI users: the Comfy registry's own validator accepts the pack."""

import pathlib
import subprocess

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


def test_installing_requirements_txt_keeps_the_installed_torch(tmp_path):
    """pip, asked to install requirements.txt into a Python whose torch is an older one (2.1.0, the oldest
    pyproject.toml admits), plans nothing for torch, torchvision or torchaudio."""
    import json
    import sys

    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    python = tmp_path / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    installed = pathlib.Path(site) / "torch-2.1.0.dist-info"  # what pip reads of an installed torch: its metadata
    installed.mkdir()
    (installed / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.1.0\n")
    (installed / "INSTALLER").write_text("pip\n")
    (installed / "RECORD").write_text("")
    report = tmp_path / "report.json"
    result = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                             "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "peft" in planned and not PROVIDED_BY_COMFYUI & planned, planned
