"""``sfgrpo run``: run an API-format ComfyUI workflow headless and download what it outputs.

The runner talks to a ComfyUI server over HTTP and its websocket (``--server URL``), or starts one for the run
(``--start-server``: ``$COMFYUI_PATH`` or the offline ComfyUI of :mod:`.comfyui_server`, with this pack loaded).
It never imports comfy and exchanges JSON only.

    sfgrpo run workflow_api.json --start-server --set "Empty Image.width=256" --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_text
from ..training.metrics import TRAINING_EVENT
from .server import ComfyServer, ComfyUIError

DEFAULT_SERVER = "http://127.0.0.1:8188"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
Workflow = dict[str, dict[str, Any]]


class WorkflowError(ValueError):
    """A bad workflow file, a bad ``--set``, an unreachable server or a workflow ComfyUI refused (exit code 2)."""


@dataclass(frozen=True)
class RunResult:
    """What one run produced.

    Attributes:
        prompt_id: ComfyUI's id of the run.
        status: ``"success"``, ``"error"`` or ``"interrupted"``.
        files: the downloaded files, under the run's out_dir.
        outputs: node id -> ``{"files": [paths relative to out_dir], <other UI outputs such as "text">}``, as
            written to ``out_dir/outputs.json``.
    """

    prompt_id: str
    status: str
    files: list[Path]
    outputs: dict[str, dict[str, Any]]


def load_workflow(path: str | Path) -> Workflow:
    """Read an API-format workflow (node id -> {"class_type", "inputs"}); UI-format files are refused."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise WorkflowError(f"cannot read workflow {path}: {error}") from error
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise WorkflowError(f"{path} is a UI-format workflow (the graph the editor saves); export it in API format "
                            "instead: in ComfyUI use Workflow > Export (API), or \"Save (API)\" in older menus")
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{path} is not an API-format workflow (a JSON object of node id -> node)")
    for node_id, node in data.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)
                and isinstance(node.get("inputs", {}), dict)):
            raise WorkflowError(f"{path}: node {node_id} is not an API-format node "
                                "({\"class_type\": ..., \"inputs\": {...}})")
    return data


def _title(node: dict[str, Any]) -> str | None:
    return node.get("_meta", {}).get("title")


def describe_node(workflow: Workflow, node_id: str, class_type: str | None = None) -> str:
    """``node 5 (KSampler)``, with the title when it differs: ``node 5 (KSampler "Final pass")``."""
    node = workflow.get(str(node_id), {})
    class_type = class_type or node.get("class_type", "?")
    title = _title(node)
    return f"node {node_id} ({class_type}" + (f" \"{title}\")" if title and title != class_type else ")")


def _find_node(workflow: Workflow, name: str) -> str:
    """The id of the node whose id or ``_meta.title`` is ``name``."""
    if name in workflow:
        return name
    matches = [node_id for node_id, node in workflow.items() if _title(node) == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise WorkflowError(f"--set: several nodes are titled {name!r} ({', '.join(matches)}); use a node id")
    valid = ", ".join(describe_node(workflow, node_id) for node_id in workflow)
    raise WorkflowError(f"--set: no node with id or title {name!r}; the nodes are: {valid}")


def apply_overrides(workflow: Workflow, overrides: Iterable[str]) -> Workflow:
    """Apply ``NODE.INPUT=VALUE`` settings in place and return the workflow.

    NODE is a node id or its title; VALUE is parsed as JSON when it parses (``512``, ``true``, ``"a b"``), else
    taken as a string. Only inputs the node already has can be set.
    """
    for override in overrides:
        target, equals, text = override.partition("=")
        node_name, dot, input_name = target.rpartition(".")
        if not (equals and dot and node_name and input_name):
            raise WorkflowError(f"--set {override!r}: expected NODE.INPUT=VALUE (NODE: a node id or title)")
        node_id = _find_node(workflow, node_name)
        inputs = workflow[node_id].setdefault("inputs", {})
        if input_name not in inputs:
            raise WorkflowError(f"--set {override!r}: {describe_node(workflow, node_id)} has no input "
                                f"{input_name!r}; its inputs are: {', '.join(inputs) or 'none'}")
        try:
            inputs[input_name] = json.loads(text)
        except ValueError:
            inputs[input_name] = text
    return workflow


def format_validation_error(workflow: Workflow, body: dict[str, Any]) -> str:
    """ComfyUI's HTTP 400 answer in plain words, one line per problem.

    ``node 5 (KSampler) input 'steps': Value 0 smaller than min of 1``
    """
    lines = []
    node_errors = body.get("node_errors") or {}
    for node_id, entry in node_errors.items():
        where = describe_node(workflow, node_id, entry.get("class_type"))
        for error in entry.get("errors", []):
            input_name = (error.get("extra_info") or {}).get("input_name")
            details = str(error.get("details") or "")
            line = f"{where} input {input_name!r}: " if input_name else f"{where}: "
            line += error.get("message", "invalid")
            lines.append(line + (f" ({details})" if details and details != input_name else ""))
    if not lines:
        problem = body.get("error") or {}
        if not isinstance(problem, dict):
            problem = {"message": str(problem)}
        summary = problem.get("message", "ComfyUI refused the workflow")
        lines.append(summary + (f" ({problem['details']})" if problem.get("details") else ""))
    return "\n".join(lines)


class _Client:
    """The few HTTP calls the runner makes (stdlib only, JSON bodies)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def request(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        """(status, body) of ``method path``; a 4xx/5xx answer is returned, an unreachable server raises."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, OSError) as error:
            raise WorkflowError(f"cannot reach ComfyUI at {self.base_url}: {error}; start one or use "
                                "--start-server") from error

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        """The JSON answer of a call that must succeed."""
        status, body = self.request(method, path, payload)
        if status != 200:
            raise WorkflowError(f"ComfyUI answered {status} to {method} {path}: {body[:500]!r}")
        return json.loads(body)

    def websocket_url(self, client_id: str) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"


class _Progress:
    """Turns websocket events of one prompt into lines for ``on_event``; remembers how the run ended."""

    def __init__(self, workflow: Workflow, on_event: Callable[[str], None], verbose: bool) -> None:
        self.workflow, self.on_event, self.verbose = workflow, on_event, verbose
        self.status = "success"
        self._shown: tuple[str, int] | None = None

    def handle(self, kind: str, data: dict[str, Any]) -> None:
        """One event (``executing``, ``progress``, ``execution_error``, ...); others are ignored."""
        if kind == "execution_cached" and data.get("nodes"):
            self.on_event(f"cached: {', '.join(describe_node(self.workflow, n) for n in data['nodes'])}")
        elif kind == "executing" and data.get("node") is not None:
            self.on_event(f"executing {describe_node(self.workflow, data['node'])}")
        elif kind == "progress":
            self._progress(str(data.get("node")), int(data.get("value", 0)), int(data.get("max", 0)))
        elif kind == "execution_error":
            self.status = "error"
            message = (f"error in {self._failed_node(data)}: {data.get('exception_type', 'Exception')}: "
                       f"{data.get('exception_message', '').strip()}")
            if self.verbose and data.get("traceback"):
                message += "\n" + "".join(data["traceback"]).rstrip()
            self.on_event(message)
        elif kind == "execution_interrupted":
            self.status = "interrupted"
            self.on_event(f"interrupted in {self._failed_node(data)}")
        elif kind == TRAINING_EVENT and isinstance(data.get("record"), dict):
            self.on_event(f"  {training_line(data['record'])}")

    def _failed_node(self, data: dict[str, Any]) -> str:
        """The node named by an execution_error or execution_interrupted event."""
        return describe_node(self.workflow, str(data.get("node_id")), data.get("node_type"))

    def _progress(self, node: str, value: int, total: int) -> None:
        """A bar line each time a node's progress crosses a tenth (and at its end)."""
        if total <= 0:
            return
        tenth = min(10, 10 * value // total)
        if self._shown == (node, tenth):
            return
        self._shown = (node, tenth)
        self.on_event(f"  [{'#' * tenth}{'.' * (10 - tenth)}] {value}/{total} {describe_node(self.workflow, node)}")


def training_line(record: dict[str, Any]) -> str:
    """One training iteration's metrics (a "sfgrpo.training" event of the trainer node) as a line."""
    parts = [f"iteration {record.get('iteration')}"]
    for key, label, spec in (("reward_mean", "reward", ".3f"), ("eval_reward_mean", "held-out", ".3f"),
                             ("approx_kl", "kl", ".1e"), ("clip_fraction", "clipped", ".2f")):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{label} {record[key]:{spec}}")
    return ", ".join(parts)


def _stream_events(websocket: Any, prompt_id: str, progress: _Progress) -> None:
    """Feed the prompt's events to ``progress`` until ComfyUI reports it done (``executing`` with node null)."""
    while True:
        message = websocket.recv()
        if not isinstance(message, str):  # binary preview frames
            continue
        event = json.loads(message)
        data = event.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if event.get("type") == "executing" and data.get("node") is None:
            return
        progress.handle(event.get("type", ""), data)


def _local_path(out_dir: Path, subfolder: str, filename: str) -> Path:
    """``out_dir/subfolder/filename``, refusing names that would leave out_dir."""
    path = (out_dir / subfolder / filename).resolve()
    if not path.is_relative_to(out_dir.resolve()):
        raise WorkflowError(f"ComfyUI returned an unsafe output name {subfolder!r}/{filename!r}")
    return path


def _is_file_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "filename" in v for v in value)


def download_outputs(client: _Client, node_outputs: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, dict]:
    """Download every file the history lists (via ``GET /view``) into out_dir, keeping subfolders.

    Returns node id -> ``{"files": [relative paths], <the node's other UI outputs>}``.
    """
    outputs: dict[str, dict[str, Any]] = {}
    for node_id, ui in node_outputs.items():
        entry: dict[str, Any] = {"files": []}
        for key, value in ui.items():
            if not _is_file_list(value):
                entry[key] = value
                continue
            for item in value:
                subfolder, filename = item.get("subfolder", ""), item["filename"]
                query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder,
                                                "type": item.get("type", "output")})
                status, body = client.request("GET", f"/view?{query}")
                if status != 200:
                    raise WorkflowError(f"ComfyUI answered {status} to GET /view?{query}")
                path = _local_path(out_dir, subfolder, filename)
                atomic_write_bytes(path, body)
                entry["files"].append(path.relative_to(out_dir.resolve()).as_posix())
        outputs[node_id] = entry
    return outputs


def run_workflow(workflow_path: str | Path, *, server_url: str | None = None, start_server: bool = False,
                 overrides: Sequence[str] = (), out_dir: str | Path | None = None,
                 on_event: Callable[[str], None] = print, verbose: bool = False) -> RunResult:
    """Run an API-format workflow on ComfyUI and download its outputs.

    Args:
        workflow_path: the workflow JSON (API format: exported with "Save (API)").
        server_url: a running ComfyUI (default http://127.0.0.1:8188 unless ``start_server``).
        start_server: start a ComfyUI for this run (files under ``out_dir/comfyui``) and stop it afterwards.
        overrides: ``NODE.INPUT=VALUE`` settings (see :func:`apply_overrides`).
        out_dir: where files and ``outputs.json`` go (default ``runs/<workflow name>``).
        on_event: receives one line per progress event.
        verbose: include ComfyUI's traceback in execution errors.

    Raises:
        WorkflowError: bad file or override, unreachable server, or a workflow ComfyUI refused.
    """
    if server_url and start_server:
        raise WorkflowError("use either a server URL or start_server, not both")
    workflow = apply_overrides(load_workflow(workflow_path), overrides)
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / Path(workflow_path).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    if not start_server:
        return _run_on(_Client(server_url or DEFAULT_SERVER), workflow, out_dir, on_event, verbose)
    on_event("starting ComfyUI")
    with ComfyServer(out_dir / "comfyui") as server:
        on_event(f"ComfyUI ready at {server.url} (log: {server.log_path})")
        return _run_on(_Client(server.url), workflow, out_dir, on_event, verbose)


def _submit(client: _Client, workflow: Workflow, client_id: str) -> str:
    """POST /prompt; returns the prompt id. A workflow with invalid nodes is refused (and never left running)."""
    status, body = client.request("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status not in (200, 400) or not isinstance(answer, dict):
        raise WorkflowError(f"ComfyUI answered {status} to POST /prompt: {body[:500]!r}")
    if status == 400 or answer.get("node_errors"):
        if "prompt_id" in answer:  # ComfyUI queues the outputs that did validate; drop them
            _cancel(client, answer["prompt_id"])
        raise WorkflowError("ComfyUI refused the workflow:\n" + format_validation_error(workflow, answer))
    return answer["prompt_id"]


def _cancel(client: _Client, prompt_id: str) -> None:
    """Remove the prompt from the queue, or interrupt it when it is running (other prompts are left alone)."""
    client.request("POST", "/queue", {"delete": [prompt_id]})
    client.request("POST", "/interrupt", {"prompt_id": prompt_id})


def _run_on(client: _Client, workflow: Workflow, out_dir: Path, on_event: Callable[[str], None],
            verbose: bool) -> RunResult:
    """Submit, stream progress, then fetch the history and the files."""
    import websocket

    client_id = uuid.uuid4().hex
    client.request("GET", "/system_stats")  # a clear error when the server is down, before the websocket's
    connection = websocket.create_connection(client.websocket_url(client_id), timeout=None)
    prompt_id = None
    try:
        prompt_id = _submit(client, workflow, client_id)
        on_event(f"queued prompt {prompt_id}")
        progress = _Progress(workflow, on_event, verbose)
        _stream_events(connection, prompt_id, progress)
    except KeyboardInterrupt:
        if prompt_id is not None:
            _cancel(client, prompt_id)
        raise
    except (websocket.WebSocketException, OSError) as error:
        raise ComfyUIError(f"lost the connection to ComfyUI at {client.base_url}: {error}") from error
    finally:
        connection.close()
    history = client.json("GET", f"/history/{prompt_id}").get(prompt_id, {})
    if progress.status == "success" and history.get("status", {}).get("status_str", "success") != "success":
        progress.status = "error"
    outputs = download_outputs(client, history.get("outputs", {}), out_dir)
    atomic_write_text(out_dir / "outputs.json", json.dumps(outputs, indent=2) + "\n")
    files = [out_dir.resolve() / name for entry in outputs.values() for name in entry["files"]]
    on_event(f"{progress.status}: {len(files)} file(s) in {out_dir}")
    return RunResult(prompt_id=prompt_id, status=progress.status, files=files, outputs=outputs)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sfgrpo run`` arguments: WORKFLOW [--server URL | --start-server] [--set NODE.INPUT=VALUE ...]."""
    parser.add_argument("workflow", help="API-format workflow JSON (in ComfyUI: Workflow > Export (API))")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, metavar="URL", help=f"a running ComfyUI (default: {DEFAULT_SERVER})")
    where.add_argument("--start-server", action="store_true",
                       help="start a headless ComfyUI for this run ($COMFYUI_PATH, else the offline 0.3.75)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set a node input (NODE: id or title; VALUE: JSON, else a string); repeatable")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the output files and outputs.json (default: runs/<workflow name>)")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's traceback on execution errors")


def run_from_args(args: argparse.Namespace) -> int:
    """Run as parsed by :func:`add_run_arguments`; 0 ok, 1 execution error or interrupted, 2 bad input."""
    try:
        result = run_workflow(args.workflow, server_url=args.server, start_server=args.start_server,
                              overrides=args.overrides, out_dir=args.out, verbose=args.verbose)
    except WorkflowError as error:
        print(f"sfgrpo run: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ComfyUIError as error:
        print(f"sfgrpo run: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if result.status == "success" else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sfgrpo_core.headless.runner`` (the same as ``sfgrpo run``)."""
    parser = argparse.ArgumentParser(prog="sfgrpo run", description="Run an API-format ComfyUI workflow headless.")
    add_run_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
