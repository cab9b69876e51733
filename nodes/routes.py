"""The pack's HTTP route on ComfyUI's server: the metrics of a training run so far, for the live training view
(web/js/sfgrpo_training_view.js) to refill its chart after a page reload.

``GET /sfgrpo/training?run_name=<run_name>`` answers ``{"run": <folder name> | null, "iterations": <N> | null,
"records": [...]}`` for the newest run folder ``output/sfgrpo/<run_name>_NNNNN`` (the one training now, or the last
one): its config's iteration count and its metrics.jsonl records so far (a half-written last line is left out).
No such run: ``records`` is empty (200, so that the page logs no error). A run_name that is not a plain folder name:
400.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..sfgrpo_core.training.metrics import json_safe
from ..sfgrpo_core.training.runs import RUN_NAME

ROUTE = "/sfgrpo/training"
_registered = False


def newest_run(root: Path, run_name: str) -> Path | None:
    """``root/<run_name>_NNNNN`` with the highest number, or None."""
    if not root.is_dir():
        return None
    numbered = sorted((int(match.group(1)), path) for path in root.glob(f"{run_name}_*")
                      if (match := re.fullmatch(re.escape(run_name) + r"_(\d{5})", path.name)) and path.is_dir())
    return numbered[-1][1] if numbered else None


def run_metrics(root: Path, run_name: str) -> dict[str, Any]:
    """What the route answers for ``run_name`` under the runs folder ``root`` (see the module docstring).

    Raises:
        ValueError: run_name is not a plain folder name.
    """
    if not RUN_NAME.match(run_name) or ".." in run_name:
        raise ValueError(f"run_name: {run_name!r} is not a plain folder name")
    run_dir = newest_run(root, run_name)
    if run_dir is None:
        return {"run": None, "iterations": None, "records": []}
    iterations = None
    try:
        iterations = int(json.loads((run_dir / "config.json").read_text())["train"]["iterations"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line being written
        if isinstance(record, dict):
            records.append(record)
    return {"run": run_dir.name, "iterations": iterations, "records": json_safe(records)}


def register_routes() -> bool:
    """Add ``GET /sfgrpo/training`` to ComfyUI's PromptServer (once; later calls do nothing).

    Call it while ComfyUI loads the pack (e.g. from the extension's ``get_node_list``/``on_load``): the routes must be
    added before the server starts. Returns whether the route is registered (False outside a ComfyUI server).
    """
    global _registered
    if _registered:
        return True
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False

    @instance.routes.get(ROUTE)
    async def training_metrics(request: web.Request) -> web.Response:
        from .train import runs_root

        run_name = request.query.get("run_name", "")
        try:
            answer = run_metrics(runs_root(), run_name)
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(answer)

    _registered = True
    return True
