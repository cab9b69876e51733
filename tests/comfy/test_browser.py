"""The live training view in ComfyUI's real frontend, in a real headless browser.

Debian's Chromium (``/usr/bin/chromium``, or ``$SFGRPO_CHROMIUM``), driven by ``playwright-core`` from npm
(tests/browser/package.json; no browser download), opens the real ComfyUI of the ``comfy_server`` fixture with this
pack, loads the train_lora template, shrinks it to a 2-iteration run, queues it and waits for the end
(tests/browser/check_training_view.mjs). Chromium and the npm packages are installed when missing (apt-get as root
or through ``sudo -n``, ``npm ci``); when that is impossible the test fails with the command to run.

Screenshots land in the test's temporary folder and the Train LoRA node's one also in tests/browser/artifacts/.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
SCRIPT = BROWSER_DIR / "check_training_view.mjs"
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


@pytest.fixture(scope="module")
def browser_run(comfy_server, tmp_path_factory) -> tuple[dict, Path]:
    """The check script's result.json and its folder (screenshots), after one small training run in the page."""
    chromium = ensure_chromium()
    node = ensure_node_modules()
    out = tmp_path_factory.mktemp("browser")
    command = [node, str(SCRIPT), comfy_server.url, str(out), "--timeout-s", "600", "--chromium", str(chromium)]
    try:
        completed = _run(command, cwd=BROWSER_DIR, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("the browser check ran past 900 s:\n" + comfy_server.log_tail(), pytrace=False)
    result_file = out / "result.json"
    if completed.returncode != 0 or not result_file.is_file():
        pytest.fail(f"the browser check failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n"
                    f"{completed.stderr[-3000:]}\nserver log:\n{comfy_server.log_tail()}", pytrace=False)
    result = json.loads(result_file.read_text())
    ARTIFACTS.mkdir(exist_ok=True)
    for name, target in (("train_node.png", "training_view.png"), ("chart.png", "training_chart.png")):
        if (out / name).is_file():
            shutil.copyfile(out / name, ARTIFACTS / target)
    return result, out


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


def test_the_view_is_neither_queued_nor_saved_with_the_workflow(browser_run):
    result, _ = browser_run
    serialized = result["serialized"]
    assert "iterations" in serialized["prompt_inputs"]
    assert not [name for name in serialized["prompt_inputs"] if name.startswith("sfgrpo_")], serialized
    assert len(serialized["widgets_values"]) == 25 and serialized["widgets_values"][0] == result["run_name"]


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


def test_the_screenshots_show_the_page_the_node_and_the_chart(browser_run):
    result, out = browser_run
    for name in ("page.png", "train_node.png", "chart.png"):
        with Image.open(out / name) as image:
            assert image.width > 100 and image.height > 100, name
            assert len(image.convert("L").getcolors(256)) > 16, f"{name} is blank"
    assert (ARTIFACTS / "training_view.png").is_file()
