"""Every example API workflow on a real ComfyUI server over HTTP (the headless runner), on the committed mini world;
Cancel (POST /interrupt) during training; the object_info the frontend sees."""

import base64
import io
import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfgrpo_core.headless.runner import load_workflow, run_workflow
from sfgrpo_core.training.checkpoint import latest_checkpoint, load_checkpoint

API_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "api"
# The training workflow at test size: a couple of tiny iterations instead of the demo's 40.
SMALL_TRAINING = ("Train LoRA.iterations=2", "Train LoRA.group_size=2", "Train LoRA.groups_per_iteration=2",
                  "Train LoRA.steps=4", "Train LoRA.substeps=1", "Train LoRA.eval_samples=1",
                  "Train LoRA.checkpoint_every=1", "Train LoRA.eval_every=1", "Train Captions.per_category=1",
                  "Held-out Captions.per_category=1")


def run(server, name: str, out_dir: Path, *overrides: str, events: list[str] | None = None):
    events = [] if events is None else events
    result = run_workflow(API_WORKFLOWS / f"{name}.json", server_url=server.url, overrides=overrides,
                          out_dir=out_dir, on_event=events.append)
    assert result.status == "success", "\n".join(events[-20:]) + "\n" + server.log_tail()
    return result


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def files_with(result, prefix: str) -> list[Path]:
    return sorted(path for path in result.files if path.name.startswith(prefix))


@pytest.fixture(scope="module")
def euler_run(comfy_server, tmp_path_factory):
    return run(comfy_server, "sde_vs_euler", tmp_path_factory.mktemp("sde_vs_euler"))


@pytest.fixture(scope="module")
def training_events() -> list[str]:
    return []


@pytest.fixture(scope="module")
def training_run(comfy_server, tmp_path_factory, training_events):
    return run(comfy_server, "train_lora", tmp_path_factory.mktemp("train"), *SMALL_TRAINING,
               events=training_events)


def test_every_example_workflow_is_tested_here():
    assert sorted(path.stem for path in API_WORKFLOWS.glob("*.json")) == [
        "credit_signal", "sample_with_lora", "score_images", "sde_vs_euler", "train_lora", "train_lora_flux_ocr",
        "train_lora_sd35_pickscore", "tweedie_preview"]  # the last two: test_templates_real_models.py


def test_sde_vs_euler_samples_with_ksampler_names_and_sampler_custom_advanced(euler_run):
    euler, ddim, flow = (files_with(euler_run, prefix) for prefix in ("euler", "ddim_sde", "flow_sde"))
    assert len(euler) == len(ddim) == len(flow) == 4
    assert pixels(euler[0]).shape == (64, 64, 3)
    assert np.abs(pixels(euler[0]) - pixels(ddim[0])).max() > 8  # the SDE's noise changes the sample


def test_credit_signal_gives_a_verdict_and_a_plot_for_each_reward(comfy_server, tmp_path):
    """At test size (8 trajectories of 4 steps, 2 continuations): the measurement's plumbing, not its verdict (the
    verdicts at the example's own size are in docs/results.md)."""
    small = [f"Credit Signal: {reward}.{key}={value}" for reward in ("MiniGenEval", "mini_pickscore")
             for key, value in (("batches", 1), ("continuations", 2), ("group_size", 4), ("groups", 2),
                                ("steps", 4))]
    result = run(comfy_server, "credit_signal", tmp_path, *small, "Train Captions.per_category=1")
    for node_id, prefix in (("8", "credit_signal_geneval"), ("9", "credit_signal_pickscore")):
        text = "\n".join(result.outputs[node_id]["text"])
        assert text.startswith(("per-step credit is", "no verdict")) and "step" in text, text
        [plot] = files_with(result, prefix)
        assert pixels(plot).std() > 5


def test_score_images_shows_the_scores_on_the_node(comfy_server, tmp_path):
    result = run(comfy_server, "score_images", tmp_path)
    text = "\n".join(result.outputs["11"]["text"])
    assert "mean" in text and len(files_with(result, "scored")) == 4


def test_tweedie_preview_saves_the_estimate_grid_and_step_reward_curves(comfy_server, tmp_path):
    result = run(comfy_server, "tweedie_preview", tmp_path)
    [grid] = files_with(result, "tweedie_grid")
    [curve] = files_with(result, "step_rewards")
    height, width, _ = pixels(grid).shape
    assert (height, width) == (2 * 64, 9 * 64)  # 2 samples x (8 step estimates + the final image)
    assert pixels(curve).std() > 0
    # The node shows the same curves on itself (a temp preview, downloaded like any other output).
    [shown] = result.outputs["8"]["files"]
    assert np.array_equal(pixels(tmp_path / shown), pixels(curve)), shown


def test_the_runner_prints_each_training_iteration(training_run, training_events):
    lines = [line.strip() for line in training_events if line.strip().startswith("iteration ")]
    assert [line.split(",")[0] for line in lines] == ["iteration 0", "iteration 1"], training_events
    assert "reward " in lines[0] and "held-out " in lines[0] and "kl " in lines[0]


def test_train_lora_writes_lora_curve_and_before_after_images(comfy_server, training_run):
    assert len(files_with(training_run, "before")) == len(files_with(training_run, "after")) == 8
    assert files_with(training_run, "reward_curve")
    summary = "\n".join(training_run.outputs["12"]["text"])
    assert "sfgrpo/sfgrpo_lora_" in summary and "held-out reward" in summary
    run_dir = Path(summary.split("run folder: ")[1].splitlines()[0])
    assert run_dir.is_relative_to(comfy_server.output_dir) and (run_dir / "metrics.jsonl").is_file()
    saved = list((comfy_server.output_dir / "loras").glob("sfgrpo_lora*.safetensors"))
    assert len(saved) == 1  # the stock SaveLoRA
    assert list((comfy_server.models_dir / "loras" / "sfgrpo").glob("sfgrpo_lora_*.safetensors"))


def test_sample_with_lora_loads_every_key_and_changes_the_image(comfy_server, training_run, tmp_path):
    summary = "\n".join(training_run.outputs["12"]["text"])
    lora_name = summary.split("LoRA: ")[1].split(" ")[0]
    log_before = comfy_server.log_path.read_text()
    with_lora = run(comfy_server, "sample_with_lora", tmp_path / "lora", f"Load LoRA.lora_name={lora_name}")
    without = run(comfy_server, "sample_with_lora", tmp_path / "base", "Load LoRA.strength_model=0")
    new_log = comfy_server.log_path.read_text()[len(log_before):]
    assert "lora key not loaded" not in new_log
    after = [pixels(path) for path in files_with(with_lora, "with_lora")]
    base = [pixels(path) for path in files_with(without, "with_lora")]
    assert max(np.abs(a - b).max() for a, b in zip(after, base, strict=True)) > 1


def test_sample_with_lora_runs_as_shipped_with_the_demo_lora(comfy_server, tmp_path):
    """On a fresh install (no training run yet) the example loads the pack's demo LoRA, whole, and it changes the
    image."""
    log_before = comfy_server.log_path.read_text()
    shipped = run(comfy_server, "sample_with_lora", tmp_path / "shipped")
    without = run(comfy_server, "sample_with_lora", tmp_path / "base", "Load LoRA.strength_model=0")
    assert "lora key not loaded" not in comfy_server.log_path.read_text()[len(log_before):]
    after = [pixels(path) for path in files_with(shipped, "with_lora")]
    base = [pixels(path) for path in files_with(without, "with_lora")]
    assert after and max(np.abs(a - b).max() for a, b in zip(after, base, strict=True)) > 1


def _get_json(server, path: str):
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return json.loads(response.read())


def _post(server, path: str, payload: dict) -> dict:
    request = urllib.request.Request(server.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else {}


def _history(server, prompt_id: str, timeout: float = 60.0) -> dict:
    """The prompt's history entry; ComfyUI writes it just after it sends the final websocket message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = _get_json(server, f"/history/{prompt_id}")
        if prompt_id in entries:
            return entries[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"no history for {prompt_id} after {timeout:.0f} s")


def test_interrupt_stops_training_within_a_step_keeps_the_checkpoint_and_the_server_works(
        comfy_server, euler_run, tmp_path):
    import websocket

    workflow = load_workflow(API_WORKFLOWS / "train_lora.json")
    train = workflow["12"]["inputs"]
    train.update(iterations=200, group_size=2, groups_per_iteration=2, steps=4, substeps=1, eval_every=0,
                 checkpoint_every=1, run_name=f"interrupted_{uuid.uuid4().hex[:6]}")
    workflow["7"]["inputs"]["per_category"] = 1
    client_id = uuid.uuid4().hex
    socket = websocket.create_connection(f"ws://127.0.0.1:{comfy_server.port}/ws?clientId={client_id}", timeout=300)
    events: list[tuple[float, str, dict]] = []

    def listen():
        while True:
            message = socket.recv()
            if isinstance(message, bytes):
                continue
            data = json.loads(message)
            events.append((time.monotonic(), data["type"], data.get("data", {})))
            if data["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    prompt_id = _post(comfy_server, "/prompt", {"prompt": workflow, "client_id": client_id})["prompt_id"]
    run_root = comfy_server.output_dir / "sfgrpo"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = list(run_root.glob(f"{train['run_name']}_*")) if run_root.is_dir() else []
        newest = latest_checkpoint(runs[0]) if runs else None
        if newest is not None and newest.name >= "iter_000002":
            break
        time.sleep(0.2)
    else:
        pytest.fail("training wrote no second checkpoint in 240 s:\n" + comfy_server.log_tail())
    _post(comfy_server, "/interrupt", {})
    interrupted_at = time.monotonic()
    listener.join(timeout=120)
    socket.close()
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "execution_interrupted", kinds[-5:]
    records = [data["record"] for _, kind, data in events if kind == "sfgrpo.training"]
    assert [record["iteration"] for record in records][:2] == [0, 1] and all(d["node"] == "12" for _, k, d in events
                                                                             if k == "sfgrpo.training")
    assert "reward_mean" in records[0] and "loss" in records[0]
    # Each event carries the iteration's x0-estimate strip: one 64 px tile per step, 2 px apart (nodes/train.py).
    strip = next(data for _, kind, data in events if kind == "sfgrpo.training")["estimates"]
    assert strip["steps"] == 4 and strip["png"].startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(strip["png"].split(",", 1)[1]))) as image:
        tiles = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert tiles.shape == (64, 4 * 64 + 3 * 2, 3)
    assert np.abs(tiles[:, :64] - tiles[:, -64:]).mean() > 1  # the first step's estimate is not the last one's
    late_steps = [data for stamp, kind, data in events if kind == "progress" and stamp > interrupted_at
                  and data.get("node") == "12"]
    # At most the denoising step that was running when the flag was set, plus the message of the step before it if
    # the server had not sent it yet; a training that ignored Cancel would go on for the other ~800 steps.
    assert len(late_steps) <= 2, late_steps
    history = _history(comfy_server, prompt_id)
    assert history["status"]["status_str"] == "error"
    checkpoint = load_checkpoint(latest_checkpoint(runs[0]))
    assert checkpoint.iteration >= 2 and checkpoint.lora
    assert not list((runs[0] / "checkpoints").glob(".iter_*"))  # no half-written checkpoint left
    # The server still works, and its cached base model carries no leftover adapter: euler samples are unchanged.
    again = run(comfy_server, "sde_vs_euler", tmp_path / "again")
    for first, second in zip(files_with(euler_run, "euler"), files_with(again, "euler"), strict=True):
        assert np.abs(pixels(first) - pixels(second)).max() <= 1


def test_ui_workflows_are_the_api_workflows_for_this_comfyui_and_show_in_the_template_browser(comfy_server):
    from sfgrpo_core.headless.workflow_format import api_to_ui, dumps_workflow, ui_to_api

    object_info = _get_json(comfy_server, "/object_info")
    ui_folder = API_WORKFLOWS.parent
    for api_file in sorted(API_WORKFLOWS.glob("*.json")):
        api = json.loads(api_file.read_text())
        committed = (ui_folder / api_file.name).read_text()
        note = (ui_folder / "notes" / f"{api_file.stem}.md").read_text()  # every example has its note
        # Regenerate with: python -m sfgrpo_core.headless.workflow_format OBJECT_INFO workflows/api/*.json
        # --out-dir workflows --notes-dir workflows/notes
        assert dumps_workflow(api_to_ui(api, object_info, note=note)) == committed, f"{api_file.name}: stale"
        assert ui_to_api(json.loads(committed), object_info) == api
        notes = [node for node in json.loads(committed)["nodes"] if node["type"] == "MarkdownNote"]
        assert len(notes) == 1 and "Change first" in notes[0]["widgets_values"][0], api_file.name
    templates = _get_json(comfy_server, "/workflow_templates")
    assert sorted(templates["sfgrpo"]) == sorted(path.stem for path in API_WORKFLOWS.glob("*.json"))
    served = _get_json(comfy_server, "/api/workflow_templates/sfgrpo/train_lora.json")
    assert served == json.loads((ui_folder / "train_lora.json").read_text())


def test_every_example_has_a_thumbnail_the_template_browser_gets(comfy_server):
    """workflows/<name>.jpg (made by python -m sfgrpo_core.headless.thumbnails from the graph's real outputs)."""
    for api_file in sorted(API_WORKFLOWS.glob("*.json")):
        url = f"{comfy_server.url}/api/workflow_templates/sfgrpo/{api_file.stem}.jpg"
        with urllib.request.urlopen(url, timeout=30) as answer:
            data = answer.read()
        assert data.startswith(b"\xff\xd8") and len(data) > 2000, api_file.stem  # a real JPEG picture


def test_every_node_has_a_help_page_the_server_serves(comfy_server):
    object_info = _get_json(comfy_server, "/object_info")
    ours = sorted(name for name in object_info if name.startswith("SFGRPO"))
    assert len(ours) == 9
    for node_id in ours:
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/sfgrpo/docs/{node_id}.md", timeout=30) as page:
            assert page.read().decode().startswith("# ")
        inputs = {**object_info[node_id]["input"]["required"], **object_info[node_id]["input"].get("optional", {})}
        assert all(len(spec) > 1 and spec[1].get("tooltip") for spec in inputs.values()), node_id


def test_object_info_lists_the_sfgrpo_samplers_and_each_mini_world_file_for_its_own_loader(comfy_server):
    object_info = _get_json(comfy_server, "/object_info")

    def options(node_id: str, name: str) -> list:
        spec = object_info[node_id]["input"]["required"][name]
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    for node_id in ("KSampler", "KSamplerSelect"):
        assert {"sfgrpo_ddim_sde", "sfgrpo_flow_sde", "sfgrpo_cps_sde"} <= set(options(node_id, "sampler_name"))
    unets, vaes = options("UNETLoader", "unet_name"), options("VAELoader", "vae_name")
    assert "mini_sd3_transformer.safetensors" in unets and "mini_sd3_transformer.safetensors" not in vaes
    assert "mini_taesd.safetensors" in vaes and "mini_taesd.safetensors" not in unets
    assert not [name for name in unets + vaes if "text_encoder" in name or name.startswith("vae_diffusers")]
