import json

import pytest

from sfgrpo_core.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_valid_and_roundtrip():
    config = Config()
    assert config_from_dict(config.to_dict()) == config
    assert config.sampler.sde == "ddim" and config.credit.method == "stepwise" and config.credit.substeps == 5


def test_every_field_has_help_text():
    import dataclasses

    from sfgrpo_core.config import SECTIONS

    for section in SECTIONS.values():
        for spec in dataclasses.fields(section):
            assert len(spec.metadata["help"]) > 10, spec.name


@pytest.mark.parametrize(
    "data,message",
    [
        ({"train": {"group_size": 1}}, "train.group_size: must be >= 2"),
        ({"train": {"groupsize": 4}}, "train.groupsize: unknown field"),
        ({"trian": {}}, "trian: unknown section"),
        ({"sampler": {"sde": "ddpm"}}, "sampler.sde: 'ddpm' is not one of"),
        ({"sampler": {"sde": "ode"}}, "sampler.sde: 'ode' has no noise"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
        ({"sampler": {"steps": 2.5}}, "sampler.steps: expected an integer"),
        ({"sampler": {"eta": 1.5}}, "sampler.eta: must be <= 1.0"),
        ({"train": {"reward_options": "{bad"}}, "train.reward_options: not valid JSON"),
        ({"train": {"reward_options": '{"weights": [1, NaN]}'}}, "train.reward_options: NaN is not a finite number"),
        ({"model": {"options": '{"scale": 1e999}'}}, "model.options: 1e999 is not a finite number"),
        ({"model": {"options": '{"a": {"b": -Infinity}}'}}, "model.options: -Infinity is not a finite number"),
        ({"optim": {"lr_final_ratio": float("nan")}}, "optim.lr_final_ratio"),
        ({"train": {"prompts": [1, 2]}}, "train.prompts: expected a list of strings"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_yaml_and_json_files(tmp_path):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("train:\n  group_size: 4\n  prompts: [a, b]\n  reward_options: {quality: 50}\n")
    config = load_config(yaml_path)
    assert config.train.group_size == 4 and config.train.prompts == ("a", "b")
    assert config.reward_kwargs == {"quality": 50}
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(config.to_dict()))
    assert load_config(json_path) == config
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
