"""The recipe contract: one schema, every problem reported at once, overrides."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from adapters.config import (
    DataConfig,
    GrpoConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainConfig,
    field_choices,
    field_default,
    load_recipe,
)
from adapters.errors import ConfigError

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
SECTION_TYPES = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig,
                 "train": TrainConfig, "grpo": GrpoConfig, "output": OutputConfig}

# Written out here, not read back from the schema: a changed default or choice fails until the
# README (which states these) and this table say the new value.
DEFAULTS = {
    "model.name": "default", "model.quantization": "none", "model.dtype": "auto",
    "model.task": "causal_lm",  # README: "(default `causal_lm`)"
    "lora.r": 16, "lora.alpha": 32.0, "lora.targets": "auto",
    "data.format": "prompt_completion", "data.packing": True,  # README: "(default)"
    "data.max_seq_len": 512, "data.train": None,
    "train.objective": "sft", "train.dpo_reference": "cached",  # README: "(the default)"
    "train.dist_timeout_s": 1800, "train.max_bad_steps": 5,  # README: "(default ...)"
    "train.lr": 2e-4, "train.batch_size": 4, "train.fused_lora": True, "train.report_to": [],
    "grpo.num_generations": 4, "grpo.loss_type": "dapo", "grpo.beta": 0.0,  # TRL's, but 4
    "grpo.scale_rewards": "group", "grpo.rewards": [], "lora.init_from": None,
    "output.dir": "runs/adapter",
}
CHOICES = {  # the README's recipe table and data-format sections
    "model.quantization": ("none", "8bit", "4bit"),
    "model.quant_type": ("nf4", "fp4"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "model.task": ("causal_lm", "classification", "regression"),
    "data.format": ("text", "prompt_completion", "chat", "alpaca", "sharegpt", "preference",
                    "label"),
    "data.text_unit": ("line", "file"),
    "data.overlong": ("truncate", "drop"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.optimizer": ("adamw", "adamw_8bit"),
    "train.attention": ("auto", "sdpa", "matmul"),
    "train.parallel": ("ddp", "fsdp"),
    "train.objective": ("sft", "dpo", "orpo", "grpo"),
    "train.dpo_loss": ("sigmoid", "ipo"),
    "train.dpo_reference": ("cached", "in_step"),
    "grpo.loss_type": ("grpo", "dr_grpo", "dapo", "bnpo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
}


def test_defaults_are_the_documented_values(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\nlora:\ndata:\ntrain:\noutput:\n")  # sections, no keys
    # No recipe, an empty one and one of empty sections: all the schema's defaults.
    for cfg in (load_recipe(None), load_recipe(empty), load_recipe(bare)):
        got = cfg.to_dict()
        for dotted, want in DEFAULTS.items():
            section, key = dotted.split(".")
            assert got[section][key] == want, dotted
            assert type(got[section][key]) is type(want), dotted  # 32.0, not 32; True, not 1
    # A mutable default is a fresh object per config: one run's list never leaks into another.
    a, b = load_recipe(None), load_recipe(None)
    a.train.report_to.append("tensorboard")
    assert b.train.report_to == [] and load_recipe(None).train.report_to == []


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads_as_written(path):
    """Every key the YAML sets (parsed here with PyYAML) is in the config; the rest default."""
    raw = yaml.safe_load(path.read_text())
    assert raw.get("data", {}).get("train") and raw.get("output", {}).get("dir")
    got = load_recipe(path).to_dict()
    for section, cls in SECTION_TYPES.items():
        given = raw.get(section) or {}
        for f in dataclasses.fields(cls):
            where, value = f"{path.name}: {section}.{f.name}", got[section][f.name]
            if f.name not in given:
                assert value == field_default(cls, f.name), where
            elif section == "data" and f.name in ("train", "eval"):
                # relative paths stay as written, or resolve against the recipe's folder
                assert Path(value) in (Path(given[f.name]), path.parent / given[f.name]), where
            elif isinstance(value, float):  # YAML 1.1 leaves "1e-4" a string
                assert value == float(given[f.name]), where
            else:
                assert value == given[f.name], where


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
    assert "train.steps: must be a whole number in 1..1000000000, got -1" in msg


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


def test_field_choices_are_the_documented_ones_and_what_recipes_accept():
    """field_choices (what the CLI offers) equals the README's lists and the validator's."""
    with_choices = {f"{s}.{f.name}" for s, cls in SECTION_TYPES.items()
                    for f in dataclasses.fields(cls) if f.metadata.get("choices")}
    assert with_choices == set(CHOICES)  # a new choice field needs its documented values
    for dotted, want in CHOICES.items():
        section, key = dotted.split(".")
        assert field_choices(SECTION_TYPES[section], key) == want
        for value in want:
            assert getattr(getattr(load_recipe(None, [f"{dotted}={value}"]), section), key) \
                == value
        with pytest.raises(ConfigError, match=f"{dotted}: 'bogus' is not one of "
                                              f"{', '.join(want)}"):
            load_recipe(None, [f"{dotted}=bogus"])
    assert field_choices(DataConfig, "max_seq_len") == ()  # a field without choices
    assert field_default(DataConfig, "max_seq_len") == 512
    data = field_default(RunConfig, "data")  # a default_factory: built, and fresh each time
    assert isinstance(data, DataConfig) and data.format == "prompt_completion"
    assert field_default(TrainConfig, "report_to") == []
    assert field_default(TrainConfig, "report_to") is not field_default(TrainConfig, "report_to")
    with pytest.raises(KeyError, match="DataConfig has no field 'fromat'"):
        field_choices(DataConfig, "fromat")
