"""The headless runner against a real ComfyUI server (stock nodes only, no models)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sfgrpo_core.headless.runner import (
    RunResult,
    WorkflowError,
    _Progress,
    _stream_events,
    apply_overrides,
    load_workflow,
    main,
    run_workflow,
)

WORKFLOWS = Path(__file__).parent / "workflows"
SCALE_AND_SAVE = WORKFLOWS / "scale_and_save.json"


def _run(server, out_dir, *overrides, workflow=SCALE_AND_SAVE) -> tuple[RunResult, list[str]]:
    events: list[str] = []
    result = run_workflow(workflow, server_url=server.url, overrides=overrides, out_dir=out_dir,
                          on_event=events.append)
    return result, events


def test_server_loads_the_pack_from_the_custom_nodes_symlink(comfy_server):
    log = comfy_server.log_path.read_text()
    pack_lines = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/sfgrpo")
                  or "custom_nodes/sfgrpo " in line]
    assert pack_lines, log
    assert not any("IMPORT FAILED" in line for line in pack_lines), pack_lines


def test_run_downloads_the_png_and_writes_outputs_json(comfy_server, tmp_path):
    result, events = _run(comfy_server, tmp_path)
    assert result.status == "success", events
    [png] = result.files
    assert png.parent == tmp_path / "sfgrpo_test" and png.suffix == ".png"
    with Image.open(png) as image:
        assert image.size == (32, 24)
        assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    assert outputs == result.outputs
    assert outputs["3"]["files"] == [png.relative_to(tmp_path).as_posix()]
    assert outputs["5"]["text"] == ["hello"]
    assert any(line.startswith("executing node 2 (ImageScale") for line in events), events


def test_set_overrides_by_title_and_by_id_change_the_size(comfy_server, tmp_path):
    result, _ = _run(comfy_server, tmp_path, "Scale.width=40", "2.height=30", 'Note.value="set from the CLI"')
    with Image.open(result.files[0]) as image:
        assert image.size == (40, 30)
    assert result.outputs["5"]["text"] == ["set from the CLI"]


def test_bad_overrides_list_the_valid_nodes_and_inputs():
    workflow = load_workflow(SCALE_AND_SAVE)
    with pytest.raises(WorkflowError, match=r"no node with id or title 'Sclae'.*node 2 \(ImageScale \"Scale\"\)"):
        apply_overrides(workflow, ["Sclae.width=3"])
    with pytest.raises(WorkflowError, match=r"has no input 'widht'; its inputs are: image, upscale_method, width"):
        apply_overrides(workflow, ["Scale.widht=3"])
    with pytest.raises(WorkflowError, match="expected NODE.INPUT=VALUE"):
        apply_overrides(workflow, ["Scale=3"])
    assert apply_overrides(workflow, ["1.color=oops"])["1"]["inputs"]["color"] == "oops"


def test_event_stream_skips_previews_and_other_prompts_and_shows_tenths():
    """No server: websocket frames as ComfyUI sends them, for our prompt "p" and another one "q"."""
    def frame(kind, **data):
        return json.dumps({"type": kind, "data": data})

    frames = iter([frame("executing", node="2", prompt_id="q"), b"\x00\x00\x00\x01preview",
                   frame("executing", node="2", prompt_id="p")]
                  + [frame("progress", value=v, max=20, node="2", prompt_id="p") for v in range(1, 21)]
                  + [frame("executing", node=None, prompt_id="q"), frame("executing", node=None, prompt_id="p"),
                     frame("executing", node="3", prompt_id="p")])
    events: list[str] = []
    progress = _Progress(load_workflow(SCALE_AND_SAVE), events.append, verbose=False)
    _stream_events(type("FakeSocket", (), {"recv": lambda self: next(frames)})(), "p", progress)
    assert events[0] == "executing node 2 (ImageScale \"Scale\")"
    assert len(events) == 12 and events[-1] == "  [##########] 20/20 node 2 (ImageScale \"Scale\")"
    assert next(frames) == frame("executing", node="3", prompt_id="p")  # stopped at our end marker
    assert progress.status == "success"


def test_validation_error_exits_2_naming_node_and_input(comfy_server, tmp_path, capsys):
    code = main([str(SCALE_AND_SAVE), "--server", comfy_server.url, "--set", "Empty Image.width=0",
                 "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "node 1 (EmptyImage \"Empty Image\") input 'width': Value 0 smaller than min of 1" in err


def test_unknown_node_class_exits_2(comfy_server, tmp_path, capsys):
    workflow = json.loads(SCALE_AND_SAVE.read_text())
    workflow["2"]["class_type"] = "NoSuchScaler"
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps(workflow))
    assert main([str(path), "--server", comfy_server.url, "--out", str(tmp_path / "out")]) == 2
    assert "node NoSuchScaler does not exist" in capsys.readouterr().err


def test_ui_format_is_rejected_with_the_export_hint(tmp_path, capsys):
    assert main([str(WORKFLOWS / "ui_format.json"), "--server", "http://127.0.0.1:9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "UI-format workflow" in err and "Export (API)" in err


def test_execution_error_exits_1_naming_the_node(comfy_server, tmp_path, capsys):
    assert main([str(WORKFLOWS / "runtime_error.json"), "--server", comfy_server.url, "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "error in node 2 (ImageScaleBy \"Shrink to nothing\")" in out and "Traceback" not in out


def test_cli_module_with_start_server(tmp_path, comfyui):
    """``python -m sfgrpo_core.headless.runner --start-server``: its own ComfyUI, started and stopped for the run."""
    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, "-m", "sfgrpo_core.headless.runner", str(SCALE_AND_SAVE),
                                "--start-server", "--set", "Empty Image.color=255", "--out", str(out)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "success: 1 file(s)" in completed.stdout  # PreviewAny's text goes to outputs.json
    [png] = (out / "sfgrpo_test").glob("*.png")
    with Image.open(png) as image:
        assert image.convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert (out / "comfyui" / "comfyui.log").is_file()
