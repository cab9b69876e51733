"""The example graphs and the live training view in ComfyUI's real frontend, in a real headless browser.

Debian's Chromium (``/usr/bin/chromium``, or ``$SFGRPO_CHROMIUM``), driven by ``playwright-core`` from npm
(tests/browser/package.json; no browser download), opens the real ComfyUI of the ``comfy_server`` fixture with this
pack. tests/browser/check_examples.mjs opens every example from the template browser, converts it with the
frontend's graphToPrompt, runs it (training at one iteration) and records the layout before and after;
tests/browser/check_training_view.mjs follows a 2-iteration training run in the live view and through a page
reload. Chromium and the npm packages are installed when missing (apt-get as root or through ``sudo -n``,
``npm ci``); when that is impossible the test fails with the command to run.

Screenshots land in the tests' temporary folders and tests/browser/artifacts/.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from sfgrpo_core.headless.thumbnails import MODEL_TEMPLATES

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
SCRIPT = BROWSER_DIR / "check_training_view.mjs"
EXAMPLES_SCRIPT = BROWSER_DIR / "check_examples.mjs"
API_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "api"
EXAMPLES = sorted(path.stem for path in API_WORKFLOWS.glob("*.json"))
# The templates for real models (SD3.5, FLUX) are opened and compared, not queued: their weights are not here
# (tests/comfy/test_templates_real_models.py runs them on random-initialised models of their names).
QUEUED = [name for name in EXAMPLES if name not in MODEL_TEMPLATES]


def stage(name: str) -> str:
    """The last screenshot an example gets: after its run, or as opened."""
    return "after" if name in QUEUED else "opened"
ARTIFACTS = BROWSER_DIR / "artifacts"
CHROMIUM = Path(os.environ.get("SFGRPO_CHROMIUM", "/usr/bin/chromium"))
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]


def _run(command: list[str], *, cwd: Path | None = None, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (as root, or through passwordless sudo)."""
    if CHROMIUM.is_file():
        return CHROMIUM
    how = "apt-get update && " + " ".join(APT_INSTALL)
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None or not shutil.which("apt-get"):
        pytest.fail(f"no Chromium at {CHROMIUM} and no way to install it here; run as root: {how} "
                    "(or set SFGRPO_CHROMIUM)", pytrace=False)
    for command in (["apt-get", "update"], APT_INSTALL):
        completed = _run(prefix + command, timeout=1200)
        if completed.returncode != 0:
            pytest.fail(f"{' '.join(prefix + command)} failed:\n{completed.stderr[-3000:]}", pytrace=False)
    if not CHROMIUM.is_file():
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} is missing", pytrace=False)
    return CHROMIUM


def ensure_node_modules() -> str:
    """``node`` on PATH and tests/browser/node_modules as package-lock.json pins it (``npm ci`` when not)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("the browser test needs Node.js >= 18 with npm (Debian: apt-get install -y nodejs npm)",
                    pytrace=False)
    lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())
    wanted = lock["packages"]["node_modules/playwright-core"]["version"]
    installed = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
    if not installed.is_file() or json.loads(installed.read_text())["version"] != wanted:
        completed = _run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, timeout=600)
        if completed.returncode != 0:
            pytest.fail(f"npm ci in {BROWSER_DIR} failed:\n{completed.stderr[-3000:]}", pytrace=False)
    return node


def run_check(script: Path, server, out: Path, *arguments: str, timeout: float, options: tuple[str, ...] = ()) -> dict:
    """Run a check script (node SCRIPT URL [ARGUMENTS] OUT [OPTIONS]) against ``server`` and return its result.json;
    Chromium and the npm packages are installed first when missing."""
    chromium = ensure_chromium()
    node = ensure_node_modules()
    command = [node, str(script), server.url, *arguments, str(out), *options, "--timeout-s", "600",
               "--chromium", str(chromium)]
    try:
        completed = _run(command, cwd=BROWSER_DIR, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} ran past {timeout:.0f} s:\n" + server.log_tail(), pytrace=False)
    result_file = out / "result.json"
    if completed.returncode != 0 or not result_file.is_file():
        pytest.fail(f"{script.name} failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n"
                    f"{completed.stderr[-3000:]}\nserver log:\n{server.log_tail()}", pytrace=False)
    return json.loads(result_file.read_text())


def keep_artifacts(out: Path, names: dict[str, str]) -> None:
    """Copy screenshots of ``out`` (name -> name under tests/browser/artifacts/) that the script wrote."""
    ARTIFACTS.mkdir(exist_ok=True)
    for name, target in names.items():
        if (out / name).is_file():
            shutil.copyfile(out / name, ARTIFACTS / target)


@pytest.fixture(scope="module")
def browser_run(comfy_server, tmp_path_factory) -> tuple[dict, Path]:
    """The check script's result.json and its folder (screenshots), after one small training run in the page."""
    out = tmp_path_factory.mktemp("browser")
    result = run_check(SCRIPT, comfy_server, out, timeout=900)
    keep_artifacts(out, {"train_node.png": "training_view.png", "chart.png": "training_chart.png"})
    return result, out


@pytest.fixture(scope="module")
def examples_run(comfy_server, tmp_path_factory) -> tuple[dict, Path]:
    """check_examples.mjs's result.json and its folder (screenshots), after every example ran once in the page."""
    out = tmp_path_factory.mktemp("examples")
    result = run_check(EXAMPLES_SCRIPT, comfy_server, out, str(API_WORKFLOWS), timeout=1200,
                       options=("--open-only", ",".join(MODEL_TEMPLATES)))
    keep_artifacts(out, {f"{name}_{stage(name)}.png": f"example_{name}.png" for name in EXAMPLES})
    return result, out


def _overlaps(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


def sfgrpo_console_messages(result: dict) -> list[dict]:
    """The page's console warnings and errors about this pack, and every "Unhandled message".

    Left out: the frontend's look-ups of node names on api.comfy.org (its own Content-Security-Policy blocks them on
    every offline page).
    """
    found = []
    for message in result["console"]:
        text, url = message["text"], message["url"]
        if "Unhandled message" in text:
            found.append(message)
        elif "api.comfy.org" in text:
            continue
        elif "sfgrpo" in (text + url).lower():
            found.append(message)
    return found


def test_the_page_loads_the_extension_and_the_training_run_succeeds(browser_run):
    result, _ = browser_run
    assert result["extension_registered"], "sfgrpo.TrainingView is not among the frontend's extensions"
    assert result["end"]["end"]["kind"] == "execution_success", result["end"]
    assert result["end"]["events"] == 2  # one sfgrpo.training event per iteration reached the page


def test_nothing_is_drawn_before_the_first_training_event(browser_run):
    result, _ = browser_run
    assert not result["before"]["chart_widget"] and result["before"]["chart_points"] == 0
    assert result["before"]["train_text"] is None


def test_the_train_lora_node_plots_each_iteration_with_a_status_line(browser_run):
    result, _ = browser_run
    after = result["after"]
    assert after["chart_widget"] and after["chart_in_document"] and after["chart_visible"], after
    assert after["chart_points"] >= 2 and after["chart_eval_points"] >= 2, after
    assert [point["iteration"] for point in after["state_points"]] == [0, 1]
    assert all(point["reward_mean"] is not None and point["reward_std"] is not None
               for point in after["state_points"])
    status = after["status"]
    assert status.startswith("iteration 2/2") and " s/it" in status and "done" in status, status
    assert "reward " in status and "held-out " in status, status
    assert after["strip_visible"] and after["strip_steps"] == 4, after  # the x0-estimate strip, one per step


def test_the_view_is_neither_queued_nor_saved_with_the_workflow(browser_run):
    result, _ = browser_run
    serialized = result["serialized"]
    assert "iterations" in serialized["prompt_inputs"]
    assert not [name for name in serialized["prompt_inputs"] if name.startswith("sfgrpo_")], serialized
    # 28 widgets: run_name, resume, width, height, the 20 settings, the 3 optional lr-schedule ones, reward_decode
    assert len(serialized["widgets_values"]) == 29 and serialized["widgets_values"][0] == result["run_name"]


def test_the_score_and_train_nodes_show_their_text_output(browser_run):
    result, _ = browser_run
    after = result["after"]
    assert "run folder: " in after["train_text"] and "held-out reward" in after["train_text"], after["train_text"]
    assert len(after["score_texts"]) == 2 and all("mean: " in text for text in after["score_texts"]), after


def test_the_page_logs_no_warning_or_error_about_the_pack(browser_run):
    result, _ = browser_run
    assert sfgrpo_console_messages(result) == []
    assert [error for error in result["page_errors"]
            if "sfgrpo" in error.lower() or "training_view" in error] == []


def test_the_chart_refills_after_a_page_reload_when_the_route_is_registered(browser_run):
    """nodes/routes.py's GET /sfgrpo/training: the newest run of the node's run_name refills the chart."""
    result, _ = browser_run
    assert result["route_status"] == 200
    answer = result["route_answer"]
    assert answer["run"].startswith(result["run_name"] + "_") and answer["iterations"] == 2
    reloaded = result["reloaded"]
    assert reloaded["chart_widget"] and reloaded["chart_points"] == 2 and reloaded["chart_visible"], reloaded
    assert reloaded["status"].startswith("iteration 2/2"), reloaded["status"]


def test_a_reload_in_the_middle_of_a_run_keeps_the_chart_going(browser_run):
    """Reloaded after the first of 3 iterations: the route refills what was done, the later events follow on."""
    result, _ = browser_run
    assert result["mid_run_reloaded_at"] < 3  # the page came back while the run was still going
    mid = result["mid_run"]
    assert [point["iteration"] for point in mid["state_points"]] == [0, 1, 2], mid
    assert mid["chart_points"] == 3 and mid["status"].startswith("iteration 3/3") and "done" in mid["status"], mid


def test_the_screenshots_show_the_page_the_node_and_the_chart(browser_run):
    result, out = browser_run
    for name in ("page.png", "train_node.png", "chart.png"):
        with Image.open(out / name) as image:
            assert image.width > 100 and image.height > 100, name
            assert len(image.convert("L").getcolors(256)) > 16, f"{name} is blank"
    assert (ARTIFACTS / "training_view.png").is_file()


def test_every_example_opens_from_the_template_browser_as_its_api_file(examples_run):
    result, _ = examples_run
    assert sorted(result["examples"]) == EXAMPLES
    for name, example in result["examples"].items():
        assert example["template_card"] == name
        api = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
        assert example["prompt"] == api, f"{name}: the frontend's graphToPrompt differs from workflows/api/{name}.json"


def test_every_example_opens_with_the_whole_graph_in_view_and_a_note(examples_run):
    """No saved view in the files: the frontend fits the graph into the window, clear of what lies over the canvas."""
    result, _ = examples_run
    for name, example in result["examples"].items():
        opened = example["opened"]
        width, height = opened["viewport"]
        assert opened["overlays"]["sidebar"] and opened["overlays"]["tabs"], opened["overlays"]
        for node in opened["nodes"]:
            box = node["screen"]
            assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width, (name, node)
            assert box["y"] + box["height"] <= height, (name, node)
            covered = [key for key, overlay in opened["overlays"].items() if overlay and _overlaps(box, overlay)]
            assert not covered, f"{name}: node {node['id']} ({node['type']}) lies under the {covered}"
        assert opened["scale"] >= 0.4, f"{name}: opens at {opened['scale']:.2f}, too small to read"
        assert [node["type"] for node in opened["nodes"]].count("MarkdownNote") == 1, name


def test_no_two_nodes_overlap_before_or_after_a_run(examples_run):
    """After a run the frontend grows nodes for their previews and the pack's views: the layout has room for it."""
    result, _ = examples_run
    for name, example in result["examples"].items():
        for seen in ("opened", "after") if name in QUEUED else ("opened",):
            nodes = example[seen]["nodes"]
            overlapping = [(a["id"], a["type"], b["id"], b["type"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
                           if _overlaps(a["graph"], b["graph"])]
            assert not overlapping, f"{name} {seen}: {overlapping}"


def test_every_example_runs_and_its_nodes_show_their_results(examples_run):
    result, _ = examples_run
    assert sorted(name for name, example in result["examples"].items() if example["queued"]) == QUEUED
    for name in QUEUED:
        example = result["examples"][name]
        assert example["end"]["kind"] == "execution_success", (name, example["end"])
        shown = {entry["id"]: entry for entry in example["shown"]}
        saved = [entry for entry in shown.values() if entry["type"] == "SaveImage"]
        assert saved and all(entry["images"] >= 1 for entry in saved), (name, saved)
        for entry in shown.values():
            if entry["type"] == "SFGRPOScore":
                assert "mean: " in entry["text"], (name, entry)
            if entry["type"] == "SFGRPOCreditSignal":  # the verdict, then the table, on the node
                assert entry["text"].startswith(("per-step credit is", "no verdict")), (name, entry)
            if entry["type"] == "SFGRPOTweediePreview":  # its per-step reward curves, on the node itself
                assert entry["images"] == 1, (name, entry)
            if entry["type"] == "SFGRPOTrainLoRA":
                assert example["events"] == 1 and entry["chart_points"] == 1, (name, example["events"], entry)
                assert entry["strip_loaded"] and entry["strip_steps"] == 4, entry  # one estimate per step
                assert entry["strip_size"] == [4 * 64 + 3 * 2, 64], entry
                assert "held-out reward" in entry["text"], entry


def test_the_examples_log_no_warning_or_error_about_the_pack(examples_run):
    result, out = examples_run
    assert sfgrpo_console_messages(result) == []
    assert [error for error in result["page_errors"] if "sfgrpo" in error.lower()] == []
    for name in EXAMPLES:
        with Image.open(out / f"{name}_{stage(name)}.png") as image:
            assert len(image.convert("L").getcolors(256)) > 16, f"{name}_{stage(name)}.png is blank"
