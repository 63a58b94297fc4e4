"""The recipe contract: one schema, every problem reported at once, overrides."""

from pathlib import Path

import pytest

from adapters.config import (
    QUANTIZATIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    field_choices,
    field_default,
    load_recipe,
)
from adapters.errors import ConfigError

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def test_defaults_come_from_the_schema():
    cfg = load_recipe(None)
    assert cfg == RunConfig()
    assert cfg.model.name == "default" and cfg.lora.targets == "auto"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(path):
    cfg = load_recipe(path)
    assert cfg.data.train is not None and cfg.output.dir


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert any(n.startswith("gpt2") for n in names)
    assert any(n.startswith("smollm2") for n in names)


def test_unknown_key_names_it_and_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  stpes: 10\n  lr: 1e-4\nlora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "train.stpes" in msg and "did you mean 'steps'" in msg
    assert "lora.rank" in msg and "2 problem(s)" in msg  # all problems at once; 1e-4 is fine
    assert str(p) in msg


def test_bad_values_name_the_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  quantization: 3bit\ntrain:\n  batch_size: zero\n  steps: -1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "model.quantization: '3bit' is not one of none, 8bit, 4bit" in msg
    assert "train.batch_size: expected int" in msg
    assert "train.steps: must be a positive integer" in msg


def test_unknown_section_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_recipe(p)


def test_overrides_parse_types():
    cfg = load_recipe(None, ["train.steps=10", "train.lr=1e-4", "model.name=./tiny",
                             "data.packing=false", "lora.targets=[q_proj, v_proj]"])
    assert cfg.train.steps == 10 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.name == "./tiny" and cfg.data.packing is False
    assert cfg.lora.targets == ["q_proj", "v_proj"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(None, ["steps=10"])
    with pytest.raises(ConfigError, match="train.step"):
        load_recipe(None, ["train.step=10"])


def test_field_choices_and_defaults_read_the_schema():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    assert field_choices(DataConfig, "format") == fields["format"].metadata["choices"]
    assert field_choices(ModelConfig, "quantization") == QUANTIZATIONS
    assert field_choices(DataConfig, "max_seq_len") == ()  # a field without choices
    assert field_default(DataConfig, "max_seq_len") == DataConfig().max_seq_len
    assert field_default(RunConfig, "data") == DataConfig()  # default_factory
    with pytest.raises(KeyError, match="DataConfig has no field 'fromat'"):
        field_choices(DataConfig, "fromat")
