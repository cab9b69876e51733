"""API prompt <-> UI workflow: roundtrips, widgets_values layout, links, determinism, errors and the CLI."""

import copy
import json
import subprocess
import sys

import pytest

from sfgrpo_core.headless.workflow_format import api_to_ui, dumps_workflow, main, node_def, ui_to_api

# A small /object_info covering each kind of input the converter distinguishes.
OBJECT_INFO = {
    "Loader": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"], "display_name": "Load Checkpoint",
    },
    "PromptText": {  # a STRING output that can feed a STRING widget
        "input": {"required": {"value": ["STRING", {"default": "hello"}]}},
        "output": ["STRING"], "output_name": ["text"], "display_name": "Prompt Text",
    },
    "TextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
        "output": ["CONDITIONING"], "output_name": ["CONDITIONING"], "display_name": "Text Encode",
    },
    "EmptyLatent": {  # V3 style: a ["COMBO", {"options": ...}] input and an explicit control_after_generate
        "input": {"required": {"width": ["INT", {"default": 64}],
                               "shape": ["COMBO", {"options": ["square", "wide"], "default": "square"}],
                               "batch": ["INT", {"default": 1, "control_after_generate": True}]}},
        "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Empty Latent",
    },
    "Sampler": {  # dict order differs from input_order on purpose; the frontend follows input_order
        "input": {
            "required": {"cfg": ["FLOAT", {"default": 7.0}], "model": ["MODEL"], "seed": ["INT", {"default": 0}],
                         "steps": ["INT", {"default": 20}], "sampler_name": [["euler", "heun"], {}],
                         "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent": ["LATENT"],
                         "scheduler": [["normal", "karras"], {"control_after_generate": True}]},
            "optional": {"denoise": ["FLOAT", {"default": 1.0}], "sigmas": ["SIGMAS"],
                         "noise_seed": ["INT", {"default": 5, "control_after_generate": False}],
                         "steps_in": ["INT", {"forceInput": True}]},
            "hidden": {"unique_id": "UNIQUE_ID"},
        },
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent"],
                        "optional": ["denoise", "sigmas", "noise_seed", "steps_in"]},
        "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Sampler",
    },
    "LoadPicture": {
        "input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "display_name": "Load Picture",
    },
    "ModelPatch": {
        "input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {"default": 1.0}]}},
        "output": ["MODEL"], "output_name": ["MODEL"], "display_name": "Model Patch",
    },
    "Preview": {  # an output node without outputs
        "input": {"required": {"samples": ["LATENT"], "prefix": ["STRING", {"default": "out"}]}},
        "output": [], "output_name": [], "output_node": True, "display_name": "Preview",
    },
}


def _prompt():
    """A complete API prompt with every _meta.title set (what "Export (API)" writes)."""
    def node(class_type, title, **inputs):
        return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}

    return {
        "1": node("Loader", "Load Checkpoint", ckpt_name="b.safetensors"),
        "2": node("PromptText", "Prompt Text", value="a red circle"),
        "3": node("TextEncode", "Positive", text=["2", 0], clip=["1", 1]),
        "4": node("TextEncode", "Negative", text="blurry", clip=["1", 1]),
        "5": node("EmptyLatent", "Empty Latent", width=128, shape="wide", batch=2),
        "7": node("Sampler", "Sampler", model=["12", 0], seed=42, steps=8, cfg=4.5, sampler_name="heun",
                  scheduler="karras", positive=["3", 0], negative=["4", 0], latent=["5", 0], denoise=0.75,
                  noise_seed=3),
        "9": node("Preview", "Preview", samples=["7", 0], prefix="run"),
        "10": node("LoadPicture", "Load Picture", image="b.png"),
        "12": node("ModelPatch", "Model Patch", model=["1", 0], strength=0.5),
    }


def _node(workflow, node_id):
    return next(n for n in workflow["nodes"] if n["id"] == node_id)


def test_api_ui_api_roundtrip_is_exact_both_ways():
    prompt = _prompt()
    ui = api_to_ui(prompt, OBJECT_INFO)
    assert ui_to_api(ui, OBJECT_INFO) == prompt
    assert api_to_ui(ui_to_api(ui, OBJECT_INFO), OBJECT_INFO) == ui
    assert [n["id"] for n in ui["nodes"]] == [1, 2, 3, 4, 5, 7, 9, 10, 12] and ui["last_node_id"] == 12
    # No saved view: the frontend fits the whole graph into the window when it opens the workflow.
    assert ui["version"] == 0.4 and ui["groups"] == [] and ui["extra"] == {}


def test_widgets_values_follow_input_order_with_fixed_control_values():
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    # Sampler: input_order, not dict order; "fixed" after seed (by name) and after the combo with control;
    # noise_seed says control_after_generate False, so no value; forceInput INT is a socket, not a widget.
    assert _node(ui, 7)["widgets_values"] == [42, "fixed", 8, 4.5, "heun", "karras", "fixed", 0.75, 3]
    assert [i["name"] for i in _node(ui, 7)["inputs"]] == ["model", "positive", "negative", "latent", "sigmas",
                                                             "steps_in"]
    assert _node(ui, 5)["widgets_values"] == [128, "wide", 2, "fixed"]  # V3 combo; explicit control on an INT
    assert _node(ui, 10)["widgets_values"] == ["b.png", "image"]  # the upload button's value
    assert _node(ui, 9)["widgets_values"] == ["run"] and _node(ui, 9)["outputs"] == []
    assert [w and w.name for w in node_def("Sampler", OBJECT_INFO).widget_slots()][:2] == ["seed", None]


def test_control_values_are_skipped_on_export():
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    _node(ui, 7)["widgets_values"][1] = "randomize"  # whatever the control mode, it never reaches the prompt
    sampler = ui_to_api(ui, OBJECT_INFO)["7"]["inputs"]
    assert sampler["seed"] == 42 and sampler["steps"] == 8 and sampler["scheduler"] == "karras"
    assert "control_after_generate" not in sampler and "upload" not in ui_to_api(ui, OBJECT_INFO)["10"]["inputs"]


def test_linked_widget_input_gets_a_widget_socket_and_keeps_a_placeholder_value():
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    positive, negative = _node(ui, 3), _node(ui, 4)
    text_link = next(i for i in positive["inputs"] if i["name"] == "text")
    assert text_link["widget"] == {"name": "text"} and text_link["type"] == "STRING"
    row = next(r for r in ui["links"] if r[0] == text_link["link"])
    assert row[1:3] == [2, 0] and row[5] == "STRING"
    assert positive["widgets_values"] == [""]  # no default in the definition -> ""
    assert negative["widgets_values"] == ["blurry"] and all("widget" not in i for i in negative["inputs"])
    assert ui_to_api(ui, OBJECT_INFO)["3"]["inputs"]["text"] == ["2", 0]


def test_link_table_is_consistent():
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    nodes = {n["id"]: n for n in ui["nodes"]}
    ids = [row[0] for row in ui["links"]]
    assert ids == list(range(1, len(ids) + 1)) and ui["last_link_id"] == len(ids) == 9
    out_ids = [lid for n in ui["nodes"] for o in n["outputs"] for lid in o["links"]]
    in_ids = [i["link"] for n in ui["nodes"] for i in n["inputs"] if i["link"] is not None]
    assert sorted(out_ids) == ids and sorted(in_ids) == ids  # each link exactly once on each side
    for link_id, source, slot, target, target_slot, type_ in ui["links"]:
        output = nodes[source]["outputs"][slot]
        assert link_id in output["links"] and output["slot_index"] == slot and output["type"] == type_
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert type_ == OBJECT_INFO[nodes[source]["type"]]["output"][slot]


def test_layout_columns_by_depth_and_topological_order():
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for _, source, _, target, _, _ in ui["links"]:
        assert nodes[source]["order"] < nodes[target]["order"]
        assert nodes[source]["pos"][0] < nodes[target]["pos"][0]
    # depths: 1, 2, 5, 10 -> 0; 3, 4, 12 -> 1; 7 -> 2; 9 -> 3 (longest path from a source)
    assert {i: (n["pos"][0] - 40) // 400 for i, n in nodes.items()} == {1: 0, 2: 0, 5: 0, 10: 0, 3: 1, 4: 1, 12: 1,
                                                                        7: 2, 9: 3}
    column = sorted((n for n in nodes.values() if n["pos"][0] == 40), key=lambda n: n["pos"][1])
    for upper, lower in zip(column, column[1:], strict=False):
        assert upper["pos"][1] + upper["size"][1] < lower["pos"][1]  # stacked without overlap
    assert sorted(n["order"] for n in nodes.values()) == list(range(len(nodes)))


def test_a_note_tops_the_first_column_and_never_reaches_the_server():
    note = "**What this shows.** A sampler.\n\nChange first: the prompt."
    ui = api_to_ui(_prompt(), OBJECT_INFO, note=note)
    [card] = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert card["id"] == ui["last_node_id"] == 13 and card["widgets_values"] == [note] and card["pos"] == [40, 40]
    assert card["inputs"] == card["outputs"] == []
    column = sorted((n for n in ui["nodes"] if n["pos"][0] == 40), key=lambda n: n["pos"][1])
    assert column[0] is card and card["pos"][1] + card["size"][1] < column[1]["pos"][1]  # the note pushes it down
    assert ui_to_api(ui, OBJECT_INFO) == _prompt()  # graphToPrompt leaves notes out
    assert api_to_ui(ui_to_api(ui, OBJECT_INFO), OBJECT_INFO, note=note) == ui


def test_nodes_that_show_something_after_a_run_are_tall_enough_for_it(monkeypatch):
    from sfgrpo_core.headless import workflow_format

    plain = _node(api_to_ui(_prompt(), OBJECT_INFO), 9)["size"][1]
    monkeypatch.setitem(workflow_format.ROOM_AFTER_RUN, "Preview", 250)
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    assert _node(ui, 9)["size"][1] == plain + 250


def test_output_is_deterministic_and_independent_of_key_order():
    prompt = _prompt()
    text = dumps_workflow(api_to_ui(prompt, OBJECT_INFO))
    shuffled = dict(reversed(list(copy.deepcopy(prompt).items())))
    for node in shuffled.values():
        node["inputs"] = dict(reversed(list(node["inputs"].items())))
    assert dumps_workflow(api_to_ui(prompt, OBJECT_INFO)) == text
    assert dumps_workflow(api_to_ui(shuffled, OBJECT_INFO)) == text
    assert text.endswith("}\n") and json.loads(text) == api_to_ui(prompt, OBJECT_INFO)


def test_missing_meta_means_the_display_name_and_custom_titles_survive():
    prompt = _prompt()
    del prompt["1"]["_meta"]
    ui = api_to_ui(prompt, OBJECT_INFO)
    assert "title" not in _node(ui, 1) and "title" not in _node(ui, 7)  # same as the display name
    assert _node(ui, 3)["title"] == "Positive"
    back = ui_to_api(ui, OBJECT_INFO)
    assert back["1"]["_meta"] == {"title": "Load Checkpoint"} and back["3"]["_meta"] == {"title": "Positive"}


def test_missing_widget_inputs_get_definition_defaults():
    prompt = {"1": {"class_type": "Sampler", "inputs": {}}}
    assert _node(api_to_ui(prompt, OBJECT_INFO), 1)["widgets_values"] == [0, "fixed", 20, 7.0, "euler", "normal",
                                                                          "fixed", 1.0, 5]


def _broken(path, value):
    prompt = _prompt()
    node_id, *keys = path
    target = prompt[node_id]
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return prompt


@pytest.mark.parametrize("prompt, words", [
    ({**_prompt(), "x": {"class_type": "Loader", "inputs": {}}}, ["'x'", "numeric"]),
    ({**_prompt(), "5:3": {"class_type": "Loader", "inputs": {}}}, ["'5:3'", "Loader"]),
    (_broken(["4", "class_type"], "Nope"), ["node 4", "Nope", "object_info"]),
    (_broken(["9", "inputs", "colour"], "red"), ["node 9", "Preview", "'colour'"]),
    (_broken(["7", "inputs", "unique_id"], "7"), ["node 7", "Sampler", "'unique_id'"]),  # hidden input
    (_broken(["3", "inputs", "clip"], ["1", 2]), ["node 3", "TextEncode", "'clip'", "output 2", "Loader"]),
    (_broken(["9", "inputs", "samples"], ["9", 1]), ["node 9", "Preview", "'samples'", "output 1"]),
    (_broken(["9", "inputs", "samples"], ["99", 0]), ["node 9", "'samples'", "'99'"]),
    (_broken(["7", "inputs", "model"], 3), ["node 7", "Sampler", "'model'", "MODEL"]),
    (_broken(["12", "inputs", "model"], ["7", 0]), ["cycle", "node 7", "node 12"]),
])
def test_api_to_ui_rejects_bad_prompts_naming_node_class_and_input(prompt, words):
    with pytest.raises(ValueError) as err:
        api_to_ui(prompt, OBJECT_INFO)
    for word in words:
        assert word in str(err.value)


def test_ui_to_api_skips_muted_and_follows_bypassed_reroute_and_primitive_nodes():
    ui = api_to_ui(_prompt(), OBJECT_INFO)
    _node(ui, 12)["mode"] = 4  # bypassed ModelPatch: Sampler.model comes straight from the loader
    _node(ui, 9)["mode"] = 2  # muted Preview: left out
    _node(ui, 2)["mode"] = 2  # muted PromptText: the linked text input disappears (graphToPrompt does the same)
    # A Reroute between the negative encoder and the sampler (followed), a PrimitiveNode feeding EmptyLatent.width
    # (its value lives in the target's widget) and a Note (skipped).
    negative = next(i for i in _node(ui, 7)["inputs"] if i["name"] == "negative")
    row = next(r for r in ui["links"] if r[0] == negative["link"])
    ui["nodes"].append({"id": 20, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 50}],
                        "outputs": [{"name": "", "type": "CONDITIONING", "links": [row[0]]}]})
    ui["links"].append([50, row[1], row[2], 20, 0, "CONDITIONING"])
    row[1:3] = [20, 0]
    ui["nodes"].append({"id": 21, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [51]}], "widgets_values": [256]})
    _node(ui, 5)["inputs"].append({"name": "width", "type": "INT", "widget": {"name": "width"}, "link": 51})
    _node(ui, 5)["widgets_values"][0] = 256
    ui["links"].append([51, 21, 0, 5, 0, "INT"])
    ui["nodes"].append({"id": 22, "type": "Note", "mode": 0, "widgets_values": ["hi"]})

    prompt = ui_to_api(ui, OBJECT_INFO)
    assert sorted(prompt, key=int) == ["1", "3", "4", "5", "7", "10"]
    assert prompt["7"]["inputs"]["model"] == ["1", 0] and prompt["7"]["inputs"]["negative"] == ["4", 0]
    assert "text" not in prompt["3"]["inputs"] and prompt["3"]["inputs"]["clip"] == ["1", 1]
    assert prompt["5"]["inputs"]["width"] == 256


def test_ui_to_api_rejects_unknown_classes_inputs_links_and_widget_counts():
    cases = [
        (lambda ui: _node(ui, 1).update(type="Nope"), ["node 1", "Nope"]),
        (lambda ui: _node(ui, 5)["widgets_values"].pop(), ["node 5", "EmptyLatent", "widgets_values"]),
        (lambda ui: _node(ui, 9)["inputs"].append({"name": "bogus", "type": "X", "link": None}), ["'bogus'"]),
        (lambda ui: _node(ui, 9)["inputs"][0].update(link=99), ["node 9", "'samples'", "link 99"]),
    ]
    for edit, words in cases:
        ui = api_to_ui(_prompt(), OBJECT_INFO)
        edit(ui)
        with pytest.raises(ValueError) as err:
            ui_to_api(ui, OBJECT_INFO)
        for word in words:
            assert word in str(err.value)


def test_cli_writes_ui_files_and_check_reports_stale_ones(tmp_path, capsys):
    info, api_dir, out = tmp_path / "object_info.json", tmp_path / "api", tmp_path / "ui"
    info.write_text(json.dumps(OBJECT_INFO))
    api_dir.mkdir()
    (api_dir / "a.json").write_text(json.dumps(_prompt()))
    loader_only = {"1": {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"}}}
    (api_dir / "b.json").write_text(json.dumps(loader_only))
    files = [str(api_dir / "a.json"), str(api_dir / "b.json")]
    assert main([str(info), *files, "--out-dir", str(out)]) == 0
    assert (out / "a.json").read_text() == dumps_workflow(api_to_ui(_prompt(), OBJECT_INFO))
    assert main([str(info), *files, "--out-dir", str(out), "--check"]) == 0

    (out / "b.json").write_text((out / "b.json").read_text().replace("a.safetensors", "b.safetensors"))
    check = subprocess.run([sys.executable, "-m", "sfgrpo_core.headless.workflow_format", str(info), *files,
                            "--out-dir", str(out), "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and check.stdout.split() == [str(out / "b.json")], check.stderr
    (api_dir / "a.json").write_text(json.dumps({"1": {"class_type": "Nope", "inputs": {}}}))
    with pytest.raises(SystemExit) as exit_:
        main([str(info), *files, "--out-dir", str(out)])
    assert exit_.value.code == 2 and "Nope" in capsys.readouterr().err


def test_module_imports_without_torch_or_comfy():
    code = ("import sys, sfgrpo_core.headless.workflow_format\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'comfy')]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
