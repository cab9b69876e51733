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
