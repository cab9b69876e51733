"""The pack loads in ComfyUI with none of its optional extras installed (diffusers is only for the headless
diffusers backend and the mini world build; websocket-client only for the headless runner)."""

import json
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
NODE_IDS = {"SFGRPOSampler", "SFGRPOPrompts", "SFGRPOMiniWorldTextEncoder", "SFGRPOMiniWorldPromptList",
            "SFGRPOLoadReward", "SFGRPOScore", "SFGRPOTweediePreview", "SFGRPOTrainLoRA", "SFGRPOCreditSignal"}

SCRIPT = """
import asyncio, importlib, json, sys
for blocked in ("diffusers", "websocket"):
    sys.modules[blocked] = None  # any import of it raises ImportError, as if it were not installed
comfyui, custom_nodes = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfyui)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
importlib.import_module("utils.extra_config")
import nodes
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
import comfy.samplers
before = "sfgrpo_ddim_sde" in comfy.samplers.SAMPLER_NAMES
loaded = asyncio.run(nodes.load_custom_node(custom_nodes + "/sfgrpo"))
pack = next(module for module in list(sys.modules.values())
            if getattr(module, "__file__", None) == custom_nodes + "/sfgrpo/__init__.py")
print("RESULT " + json.dumps({"loaded": bool(loaded), "nodes": sorted(nodes.NODE_CLASS_MAPPINGS),
                              "entrypoint": callable(getattr(pack, "comfy_entrypoint", None)),
                              "v1_mappings": hasattr(pack, "NODE_CLASS_MAPPINGS"), "samplers_before": before,
                              "samplers_after": "sfgrpo_ddim_sde" in comfy.samplers.SAMPLER_NAMES}))
"""


def test_pack_loads_without_optional_extras(comfyui, tmp_path):
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "sfgrpo").symlink_to(PACK_ROOT, target_is_directory=True)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(comfyui), str(tmp_path / "custom_nodes")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["loaded"], done.stderr[-3000:]
    assert NODE_IDS <= set(result["nodes"])
    # ComfyUI's V3 pattern: comfy_entrypoint() -> ComfyExtension; the sampler names are added when it loads.
    assert result["entrypoint"] and not result["v1_mappings"]
    assert not result["samplers_before"] and result["samplers_after"]
