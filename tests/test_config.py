"""Typed configs: YAML + dotted overrides, unknown keys and wrong types rejected with key, type and value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from fmrirecon.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_config,
    parse_overrides,
)
from fmrirecon.errors import ConfigError
from fmrirecon.train import TrainConfig


@dataclass
class Decoder:
    hidden: int = 1024
    dropout: float = 0.15


@dataclass
class ExampleConfig:
    name: str = "paper"
    alphas: tuple[float, ...] = (1.0, 10.0)
    backbone: str | None = None
    mode: Literal["fast", "exact"] = "exact"
    use_prior: bool = True
    decoder: Decoder = field(default_factory=Decoder)
    stages: dict[str, TrainConfig] = field(default_factory=lambda: {"pretrain": TrainConfig(epochs=2)})


def test_yaml_then_overrides_with_nested_dotted_keys(tmp_path):
    path = tmp_path / "world.yaml"
    path.write_text(
        "name: world\ndecoder:\n  hidden: 64\nalphas: [1, 1e2, 1e4]\nstages:\n  pretrain:\n    lr: 1e-3\n"
    )
    cfg = load_config(ExampleConfig, path, ["decoder.dropout=0", "mode=fast", "stages.pretrain.epochs=5"])
    assert cfg.name == "world"
    assert cfg.decoder == Decoder(hidden=64, dropout=0.0)
    assert cfg.alphas == (1.0, 100.0, 10000.0) and all(isinstance(a, float) for a in cfg.alphas)
    assert cfg.mode == "fast"
    assert cfg.stages["pretrain"].lr == 1e-3 and cfg.stages["pretrain"].epochs == 5
    assert isinstance(cfg.stages["pretrain"], TrainConfig)
    assert cfg.use_prior is True and cfg.backbone is None


def test_defaults_round_trip_through_plain_dicts():
    cfg = ExampleConfig()
    data = config_to_dict(cfg)
    assert data["alphas"] == [1.0, 10.0] and data["decoder"] == {"hidden": 1024, "dropout": 0.15}
    assert config_from_dict(ExampleConfig, data) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("decoder.hiden=3", r"unknown config key 'decoder\.hiden' for Decoder; known keys: dropout, hidden"),
        ("learning_rate=3", r"unknown config key 'learning_rate'"),
        ("decoder.hidden=wide", r"'decoder\.hidden' expects int, got 'wide' \(str\)"),
        ("decoder.hidden=1.5", r"'decoder\.hidden' expects int, got 1\.5 \(float\)"),
        ("use_prior=maybe", r"'use_prior' expects bool, got 'maybe' \(str\)"),
        ("mode=slow", r"'mode' expects 'fast' \| 'exact', got 'slow'"),
        ("alphas=3", r"'alphas' expects tuple\[float, \.\.\.\], got 3 \(int\)"),
        ("stages.pretrain.schedule=linear", r"'stages\.pretrain\.schedule' expects 'onecycle' \| 'cosine'"),
        ("stages.pretrain.epochs=0", r"epochs must be >= 1, got 0"),
        ("name", r"key=value"),
    ],
)
def test_bad_overrides_raise_config_error_naming_key_type_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExampleConfig(), [override])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExampleConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(ExampleConfig, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("decoder:\n  depth: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'decoder\.depth'"):
        load_config(ExampleConfig, unknown)


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=null", "e=true", "f=1e-4", "g="]) == {
        "a": {"b": 3},
        "c": [1, 2],
        "d": None,
        "e": True,
        "f": "1e-4",  # YAML 1.1 reads 1e-4 as a string; float fields accept it
        "g": "",
    }
    assert apply_overrides(ExampleConfig(), ["decoder.dropout=1e-4"]).decoder.dropout == 1e-4


def test_diff_configs_names_changed_nested_keys():
    old = config_to_dict(ExampleConfig())
    new = config_to_dict(apply_overrides(ExampleConfig(), ["decoder.hidden=8", "alphas=[1, 10]"]))
    assert diff_configs(old, new) == ["decoder.hidden: 1024 -> 8"]


def test_yaml_base_file_is_read_first_and_nested_sections_merge_key_by_key(tmp_path):
    from fmrirecon.config import read_yaml

    (tmp_path / "world.yaml").write_text("a: 1\nsection: {x: 1, y: 2}\n")
    (tmp_path / "quick.yaml").write_text("base: world.yaml\nsection: {y: 3}\n")
    assert read_yaml(tmp_path / "quick.yaml") == {"a": 1, "section": {"x": 1, "y": 3}}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="chain loops back"):
        read_yaml(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        read_yaml(tmp_path / "missing.yaml")
