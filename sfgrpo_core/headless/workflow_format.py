"""ComfyUI workflow formats: the API prompt (POST /prompt) <-> the UI workflow (the frontend's LiteGraph JSON).

API format: ``{node_id: {"class_type", "inputs": {name: value | [source_id, output_index]}, "_meta": {"title"}}}``.
UI format ("version": 0.4): nodes with sockets, widget values and a position, plus one link table
``[link_id, from_node, from_slot, to_node, to_slot, type]``. Both are read against the node definitions of
GET /object_info; nothing here imports ComfyUI.

Where this follows the ComfyUI frontend (Comfy-Org/ComfyUI_frontend, read for the 1.2x series):
- Widget inputs are INT, FLOAT, STRING, BOOLEAN and combos (a list of options, or "COMBO") without "forceInput";
  every other input is a socket. Widgets and sockets follow ``input_order`` when present
  (utils/nodeDefOrderingUtil.ts: required in order, optional in order, then anything left in definition order).
- widgets_values holds one value per widget, linked or not. An INT widget gets a trailing control value when
  ``control_after_generate`` is truthy, or when it is absent and the input is named seed / noise_seed
  (useIntWidget.ts); a combo gets one when ``control_after_generate`` is truthy. We always write "fixed".
- The first required combo with image_upload / video_upload / animated_image_upload true gets an "upload" button
  widget appended to the required inputs (extensions/core/uploadImage.ts); it serialises the value "image" into
  widgets_values and nothing into the API prompt (useImageUploadWidget.ts).
- ui_to_api is graphToPrompt: nodes in mode 2 (never) or 4 (bypass) are left out; a link out of a bypassed node
  is followed to that node's input of the same type (its same-numbered slot first); links through Reroute nodes are
  followed; a link from a PrimitiveNode leaves the target's widget value in place; Note / MarkdownNote are skipped;
  finally any input linked to a node absent from the prompt is dropped.
What this does not model: subgraphs / group nodes, V3 dynamic inputs (autogrow, dynamic combos), audio upload
widgets, custom frontend widget types (treated as sockets), and widgets that frontend extensions add to particular
nodes. Newer frontends also give every widget an input slot (link null) and optional sockets a "shape"; we write
the older, still loadable form: sockets always, widget slots only when linked.

Titles: api_to_ui writes a node "title" only when ``_meta.title`` is set and differs from the display name; a
missing ``_meta`` (or title) means the display name. ui_to_api always writes ``_meta.title`` (the node's title, or
the display name). So ``ui_to_api(api_to_ui(p)) == p`` holds for prompts that set every ``_meta.title`` and give
every widget input a value (as the frontend's "Export (API)" does); ``api_to_ui(ui_to_api(w), note=n) == w``
holds for every ``w`` that api_to_ui wrote with note ``n``.

CLI: ``python -m sfgrpo_core.headless.workflow_format OBJECT_INFO_JSON API_JSON... --out-dir DIR [--notes-dir DIR]
[--check]`` (the note of ``NAME.json`` is ``NOTES_DIR/NAME.md`` when that file exists).
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})
COMBO = "COMBO"
CONTROL_VALUE = "fixed"  # the control_after_generate mode written after seed-like widgets
UPLOAD_VALUE = "image"  # the value the frontend's upload button serialises into widgets_values
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")
MODE_NEVER, MODE_BYPASS = 2, 4
# Frontend-only nodes (not in /object_info) that graphToPrompt never sends to the server.
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})

# Layout of api_to_ui (LiteGraph units; pos is the top left of a node's body, its title bar sits above it).
COLUMN_X0, COLUMN_WIDTH, ROW_Y0, NODE_GAP_Y = 40, 400, 40, 60
NODE_WIDTH, NODE_HEIGHT0, ROW_HEIGHT, MULTILINE_EXTRA_ROWS = 360, 46, 24, 3
# Room for what a node shows only after a run. The frontend grows a node to fit its image previews and the widgets
# extensions add, and a grown node would cover the one below it: the room is part of the node from the start.
IMAGE_PREVIEW_ROOM = 300
ROOM_AFTER_RUN = {"SaveImage": IMAGE_PREVIEW_ROOM, "PreviewImage": IMAGE_PREVIEW_ROOM,
                  "SFGRPOTweediePreview": IMAGE_PREVIEW_ROOM,  # its per-step reward curves (ui images)
                  "SFGRPOScore": 190,  # the scores' text box (web/js/sfgrpo_training_view.js)
                  "SFGRPOCreditSignal": 260,  # the verdict and its table, in the same text box
                  "SFGRPOTrainLoRA": 460}  # the training view (chart and estimate strip) and the summary text
# The note api_to_ui can put at the top of the first column: the frontend's MarkdownNote (not sent to the server).
NOTE_TYPE, NOTE_CHARS_PER_LINE, NOTE_LINE_HEIGHT = "MarkdownNote", 52, 20
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"  # the frontend's "yellow" node colour, as its own notes use

_NODE_ID = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class NodeInput:
    """One input of a node definition, as the frontend builds it.

    Args:
        name: the input name (the API prompt's key).
        type: "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO" or a socket type such as "MODEL".
        widget: True for a widget input, False for a socket.
        control: the widget is followed by a control_after_generate value in widgets_values.
        api: False for the frontend's upload button, which only exists in the UI format.
        default: the value a widget starts with (the definition default, the first combo option, or "" / 0).
        multiline: a multiline STRING (drawn taller).
    """

    name: str
    type: str
    widget: bool
    control: bool = False
    api: bool = True
    default: Any = None
    multiline: bool = False


@dataclass(frozen=True)
class NodeDef:
    """A node definition from /object_info: inputs in frontend order, outputs as (name, type), display name."""

    class_type: str
    inputs: tuple[NodeInput, ...]
    outputs: tuple[tuple[str, str], ...]
    display_name: str

    def input(self, name: str) -> NodeInput | None:
        """The API input called ``name`` (never the upload button), or None."""
        return next((inp for inp in self.inputs if inp.name == name and inp.api), None)

    def widget_slots(self) -> list[NodeInput | None]:
        """One entry per widgets_values element: the widget's input, or None for a control_after_generate value."""
        slots: list[NodeInput | None] = []
        for inp in self.inputs:
            if inp.widget:
                slots.append(inp)
                if inp.control:
                    slots.append(None)
        return slots


def _parse_input(name: str, spec: Any) -> NodeInput:
    """One /object_info input spec ``[type_or_options, options?]`` -> NodeInput."""
    if isinstance(spec, str):  # tolerate a bare type
        spec = [spec]
    if not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"input {name!r}: bad input spec {spec!r}")
    head = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if isinstance(head, list) or head == COMBO:
        choices = head if isinstance(head, list) else list(options.get("options") or [])
        widget = not options.get("forceInput")
        default = options["default"] if "default" in options else (choices[0] if choices else "")
        return NodeInput(name, COMBO, widget, widget and bool(options.get("control_after_generate")),
                         default=default)
    type_ = str(head)
    widget = type_ in WIDGET_TYPES and not options.get("forceInput")
    control = False
    if widget and type_ == "INT":
        control = bool(options["control_after_generate"]) if "control_after_generate" in options \
            else name in SEED_NAMES
    default = options.get("default", {"INT": 0, "FLOAT": 0, "BOOLEAN": False}.get(type_, ""))
    return NodeInput(name, type_, widget, control, default=default, multiline=bool(options.get("multiline")))


def node_def(class_type: str, object_info: Mapping[str, Any]) -> NodeDef:
    """Parse ``object_info[class_type]``; raises KeyError when the class is missing."""
    info = object_info[class_type]
    sections = info.get("input") or {}
    specs: dict[str, tuple[bool, Any]] = {}  # name -> (optional, spec), required first (the frontend's V2 flattening)
    for name, spec in (sections.get("required") or {}).items():
        specs[name] = (False, spec)
    upload_of = next((name for name, (_, spec) in specs.items() if isinstance(spec, Sequence) and len(spec) > 1
                      and isinstance(spec[1], Mapping) and any(spec[1].get(f) is True for f in UPLOAD_FLAGS)
                      and (isinstance(spec[0], list) or spec[0] == COMBO)), None)
    if upload_of is not None:
        specs["upload"] = (False, None)
    for name, spec in (sections.get("optional") or {}).items():
        specs.setdefault(name, (True, spec))
    order: list[str] = []
    input_order = info.get("input_order")
    if input_order:
        order += [n for n in input_order.get("required") or [] if n in specs and not specs[n][0]]
        order += [n for n in input_order.get("optional") or [] if n in specs and specs[n][0]]
    order += [n for n in specs if n not in order]
    inputs = []
    for name in order:
        spec = specs[name][1]
        inputs.append(NodeInput(name, "IMAGEUPLOAD", True, api=False, default=UPLOAD_VALUE) if spec is None
                      else _parse_input(name, spec))
    types = list(info.get("output") or [])
    names = list(info.get("output_name") or [])
    outputs = tuple((str(names[i]) if i < len(names) else _type_name(t), _type_name(t)) for i, t in enumerate(types))
    return NodeDef(class_type, tuple(inputs), outputs, info.get("display_name") or class_type)


def _type_name(type_: Any) -> str:
    """An output or link type as the frontend names it (a list of options is a COMBO)."""
    return COMBO if isinstance(type_, list) else str(type_)


def is_link(value: Any) -> bool:
    """ComfyUI's test for a linked API input: [source_node_id (str), output_index (int)]."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _where(node_id: Any, class_type: str, name: str | None = None) -> str:
    return f"node {node_id} ({class_type})" + (f" input {name!r}" if name is not None else "")


def api_to_ui(prompt: Mapping[str, Any], object_info: Mapping[str, Any], *, note: str | None = None
              ) -> dict[str, Any]:
    """Convert an API prompt to a UI workflow (LiteGraph "version": 0.4), deterministically.

    Node ids become ints (API ids must be canonical decimal strings); link ids run 1.. in order of (target node id,
    target input in definition order). Nodes sit in columns by depth (longest path from a source):
    x = 40 + 400 * depth, stacked down each column in execution order, each as tall as its widgets plus the room
    for what it shows after a run (``ROOM_AFTER_RUN``). The workflow has no saved view (``extra.ds``), so the
    frontend fits the whole graph into the window when it opens it.

    Args:
        prompt: {node_id: {"class_type", "inputs", "_meta"?}}; widget inputs it omits get their default.
        object_info: GET /object_info (at least the classes the prompt uses).
        note: Markdown for a note at the top of the first column (a MarkdownNote, id after the last node's;
            graphToPrompt and :func:`ui_to_api` leave it out).

    Returns:
        The UI workflow dict (serialise with :func:`dumps_workflow`).

    Raises:
        ValueError: a non-numeric node id, a class missing from object_info, an input the definition lacks, a socket
            input given a plain value, a link to a missing node or output index, or a cycle; the message names the
            node id, class and input.
    """
    defs: dict[int, NodeDef] = {}
    nodes: dict[int, Mapping[str, Any]] = {}
    for key, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, Mapping) else None
        if not isinstance(key, str) or not _NODE_ID.fullmatch(key):
            raise ValueError(f"node {key!r} ({class_type}): UI workflows need numeric node ids like '12'")
        if class_type not in object_info:
            raise ValueError(f"{_where(key, str(class_type))}: class not in object_info")
        nodes[int(key)] = node
        defs[int(key)] = node_def(str(class_type), object_info)

    # Links, numbered by (target node, target input in definition order).
    links: list[tuple[int, int, int, int, str, str]] = []  # (link id, from, from_slot, to, input name, type)
    for node_id in sorted(nodes):
        definition, inputs = defs[node_id], nodes[node_id].get("inputs") or {}
        for name in inputs:
            inp = definition.input(name)
            if inp is None:
                raise ValueError(f"{_where(node_id, definition.class_type, name)}: not an input of this class")
            if not is_link(inputs[name]) and not inp.widget:
                raise ValueError(f"{_where(node_id, definition.class_type, name)}: a {inp.type} socket needs a "
                                 f"link [node_id, output_index], got {inputs[name]!r}")
        for inp in definition.inputs:
            value: Any = inputs.get(inp.name) if inp.api else None
            if not is_link(value):
                continue
            source, slot = value
            where = _where(node_id, definition.class_type, inp.name)
            if not _NODE_ID.fullmatch(source) or int(source) not in nodes:
                raise ValueError(f"{where}: links to node {source!r}, which is not in the prompt")
            source_outputs = defs[int(source)].outputs
            if not 0 <= slot < len(source_outputs):
                raise ValueError(f"{where}: links to output {slot} of node {source} ({defs[int(source)].class_type}),"
                                 f" which has {len(source_outputs)} output(s)")
            links.append((len(links) + 1, int(source), slot, node_id, inp.name, source_outputs[slot][1]))

    order = _execution_order(nodes, links, defs)
    depth = dict.fromkeys(nodes, 0)
    for node_id in order:
        for _, source, _, target, _, _ in links:
            if target == node_id:
                depth[node_id] = max(depth[node_id], depth[source] + 1)

    ui_nodes: list[dict[str, Any]] = []
    column_y: dict[int, int] = {}
    if note is not None:
        lines = sum(max(1, -(-len(line) // NOTE_CHARS_PER_LINE)) for line in note.strip().splitlines())
        height = NODE_HEIGHT0 + NOTE_LINE_HEIGHT * lines
        ui_nodes.append({"id": max(nodes, default=0) + 1, "type": NOTE_TYPE, "pos": [COLUMN_X0, ROW_Y0],
                         "size": [NODE_WIDTH, height], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
                         "outputs": [], "title": "About this workflow", "properties": {},
                         "widgets_values": [note.strip()], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR})
        column_y[0] = ROW_Y0 + height + NODE_GAP_Y
    for rank, node_id in enumerate(order):
        definition, node = defs[node_id], nodes[node_id]
        values = node.get("inputs") or {}
        into = {name: (link_id, type_) for link_id, _, _, target, name, type_ in links if target == node_id}
        sockets = [{"name": inp.name, "type": inp.type, "link": into.get(inp.name, (None,))[0]}
                   for inp in definition.inputs if not inp.widget]
        linked_widgets = [{"name": inp.name, "type": inp.type, "widget": {"name": inp.name},
                           "link": into[inp.name][0]} for inp in definition.inputs if inp.widget and inp.name in into]
        outputs = [{"name": name, "type": type_, "slot_index": slot,
                    "links": [link_id for link_id, source, from_slot, *_ in links
                              if source == node_id and from_slot == slot]}
                   for slot, (name, type_) in enumerate(definition.outputs)]
        widgets_values = [CONTROL_VALUE if inp is None else
                          values[inp.name] if inp.api and inp.name in values and not is_link(values[inp.name])
                          else inp.default for inp in definition.widget_slots()]
        rows = max(len(sockets) + len(linked_widgets), len(outputs)) + len(widgets_values) + sum(
            MULTILINE_EXTRA_ROWS for inp in definition.inputs if inp.multiline and inp.widget)
        height = NODE_HEIGHT0 + ROW_HEIGHT * rows + ROOM_AFTER_RUN.get(definition.class_type, 0)
        y = column_y.get(depth[node_id], ROW_Y0)
        column_y[depth[node_id]] = y + height + NODE_GAP_Y
        ui_node: dict[str, Any] = {"id": node_id, "type": definition.class_type,
                                   "pos": [COLUMN_X0 + COLUMN_WIDTH * depth[node_id], y],
                                   "size": [NODE_WIDTH, height], "flags": {}, "order": rank, "mode": 0}
        title = (node.get("_meta") or {}).get("title")
        if title is not None and title != definition.display_name:
            ui_node["title"] = title
        ui_node.update({"inputs": sockets + linked_widgets, "outputs": outputs,
                        "properties": {"Node name for S&R": definition.class_type},
                        "widgets_values": widgets_values})
        ui_nodes.append(ui_node)
    ui_nodes.sort(key=lambda n: n["id"])

    return {"last_node_id": max(node["id"] for node in ui_nodes) if ui_nodes else 0, "last_link_id": len(links),
            "nodes": ui_nodes,
            "links": [[link_id, source, slot, target, _slot_of(ui_nodes, target, name), type_]
                      for link_id, source, slot, target, name, type_ in links],
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _slot_of(ui_nodes: list[dict[str, Any]], node_id: int, name: str) -> int:
    node = next(n for n in ui_nodes if n["id"] == node_id)
    return next(i for i, entry in enumerate(node["inputs"]) if entry["name"] == name)


def _execution_order(nodes: Mapping[int, Any], links: list[tuple], defs: Mapping[int, NodeDef]) -> list[int]:
    """Topological order (Kahn's algorithm, smallest id first among ready nodes); ValueError on a cycle."""
    waiting = dict.fromkeys(nodes, 0)
    consumers: dict[int, list[int]] = {n: [] for n in nodes}
    for _, source, _, target, _, _ in links:
        waiting[target] += 1
        consumers[source].append(target)
    ready = [n for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node_id = heapq.heappop(ready)
        order.append(node_id)
        for target in consumers[node_id]:
            waiting[target] -= 1
            if waiting[target] == 0:
                heapq.heappush(ready, target)
    if len(order) < len(nodes):
        stuck = ", ".join(_where(n, defs[n].class_type) for n in sorted(set(nodes) - set(order)))
        raise ValueError(f"the prompt has a cycle through {stuck}")
    return order


def _link_table(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (from node, from slot, to node, to slot); accepts list rows and the newer object form."""
    table = {}
    for row in workflow.get("links") or []:
        if isinstance(row, Mapping):
            row = [row["id"], row["origin_id"], row["origin_slot"], row["target_id"], row["target_slot"]]
        table[int(row[0])] = (int(row[1]), int(row[2]), int(row[3]), int(row[4]))
    return table


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a UI workflow to an API prompt, as the frontend's "Export (API)" (graphToPrompt) does.

    Args:
        workflow: a UI workflow ({"nodes": [...], "links": [...], ...}).
        object_info: GET /object_info (at least the classes of the nodes that run).

    Returns:
        {str(node_id): {"class_type", "inputs", "_meta": {"title"}}} for every node not muted, bypassed or virtual,
        in node id order. Inputs: widget values by name (control and upload values skipped), overridden by links
        as [str(source_id), output_slot].

    Raises:
        ValueError: a class missing from object_info, an input entry the definition lacks, a link id missing from
            the link table, or a widgets_values list whose length does not match the definition.
    """
    nodes = {int(node["id"]): node for node in workflow.get("nodes") or []}
    links = _link_table(workflow)
    prompt: dict[str, Any] = {}
    for node_id in sorted(nodes):
        node, class_type = nodes[node_id], nodes[node_id].get("type")
        if node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        if class_type not in object_info:
            if class_type in VIRTUAL_NODE_TYPES:
                continue
            raise ValueError(f"{_where(node_id, str(class_type))}: class not in object_info")
        definition = node_def(class_type, object_info)
        slots = definition.widget_slots()
        values = node.get("widgets_values") or []
        if not isinstance(values, list) or len(values) != len(slots):
            expected = [inp.name if inp else "control_after_generate" for inp in slots]
            raise ValueError(f"{_where(node_id, class_type)}: widgets_values {values!r} does not match the widgets "
                             f"{expected}")
        inputs = {inp.name: value for inp, value in zip(slots, values, strict=True) if inp is not None and inp.api}
        for entry in node.get("inputs") or []:
            name = (entry.get("widget") or {}).get("name") or entry["name"]
            if definition.input(name) is None:
                raise ValueError(f"{_where(node_id, class_type, name)}: not an input of this class")
            if entry.get("link") is None:
                continue
            if int(entry["link"]) not in links:
                raise ValueError(f"{_where(node_id, class_type, name)}: link {entry['link']} is not in the link table")
            source = _resolve_link(int(entry["link"]), entry.get("type"), nodes, links, object_info)
            if source is not None:
                inputs[name] = [str(source[0]), source[1]]
        prompt[str(node_id)] = {"class_type": class_type, "inputs": inputs,
                                "_meta": {"title": node.get("title") or definition.display_name}}
    for node in prompt.values():  # graphToPrompt drops inputs linked to nodes that are not sent
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not is_link(v) or v[0] in prompt}
    return prompt


def _resolve_link(link_id: int, want_type: Any, nodes: Mapping[int, Mapping[str, Any]],
                  links: Mapping[int, tuple[int, int, int, int]], object_info: Mapping[str, Any]
                  ) -> tuple[int, int] | None:
    """Follow a link back through bypassed and virtual nodes: (source node, output slot), or None for no link."""
    link: tuple[int, int, int, int] | None = links.get(link_id)
    for _ in range(len(nodes) + 1):
        if link is None:
            return None
        source = nodes.get(link[0])
        if source is None:
            return None
        virtual = source.get("type") not in object_info and source.get("type") in VIRTUAL_NODE_TYPES
        if not virtual and source.get("mode", 0) != MODE_BYPASS:
            return link[0], link[1]
        slots = source.get("inputs") or []
        if virtual:  # Reroute passes its input through; a PrimitiveNode has none (its value is in the widget)
            slot = link[1] if link[1] < len(slots) else None
        else:  # bypassed: the input of the wanted type, the same-numbered slot first
            slot = next((k for k in [link[1], *range(len(slots))]
                         if k < len(slots) and slots[k].get("type") == want_type), None)
        upstream = slots[slot].get("link") if slot is not None else None
        link = links.get(int(upstream)) if upstream is not None else None
    raise ValueError(f"link {link_id}: a cycle through bypassed or virtual nodes")


def dumps_workflow(workflow: Mapping[str, Any]) -> str:
    """The committed text of a workflow: JSON with indent 2, keys in insertion order, a trailing newline."""
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write (or --check) the UI version of each API workflow; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sfgrpo_core.headless.workflow_format",
                                     description="Convert ComfyUI API prompts to UI workflows (same file names).")
    parser.add_argument("object_info", type=Path, help="GET /object_info saved as JSON")
    parser.add_argument("api_json", type=Path, nargs="+", help="API-format workflows")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the UI-format workflows")
    parser.add_argument("--notes-dir", type=Path,
                        help="folder of Markdown notes: NAME.md becomes the note at the top of NAME.json's graph")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 listing the UI files that are missing or differ")
    args = parser.parse_args(argv)
    object_info = json.loads(args.object_info.read_text(encoding="utf-8"))
    stale = []
    for path in args.api_json:
        note_file = args.notes_dir / f"{path.stem}.md" if args.notes_dir else None
        note = note_file.read_text(encoding="utf-8") if note_file and note_file.is_file() else None
        try:
            text = dumps_workflow(api_to_ui(json.loads(path.read_text(encoding="utf-8")), object_info, note=note))
        except ValueError as err:
            parser.exit(2, f"{path}: {err}\n")
        target = args.out_dir / path.name
        if args.check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target)
        else:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    if stale:
        print("UI workflows out of date (rerun without --check to rewrite them):", file=sys.stderr)
        for target in stale:
            print(target)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
