"""Config loading, validation and overrides."""

import dataclasses

import pytest
import yaml

from evoray.config import (
    Config,
    FeaturesConfig,
    SelectConfig,
    TrainConfig,
    dump_config,
    load_config,
)
from evoray.errors import ConfigError


def _yaml(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_and_every_field_documented():
    cfg = load_config()
    assert cfg == Config()
    for stage in (cfg, cfg.features, cfg.select, cfg.train, cfg.generate, cfg.evolve, cfg.sweep):
        for f in dataclasses.fields(stage):
            assert f.metadata.get("help"), f"{type(stage).__name__}.{f.name} has no help"


def test_yaml_and_overrides(tmp_path):
    path = _yaml(tmp_path, {"model": "tiny-llama", "select": {"method": "tsds", "ratio": 0.2},
                            "train": {"lr": "1e-4", "epochs": 2}})
    cfg = load_config(path, ["select.ratio=0.05", "train.target_modules=[q_proj, v_proj]",
                             "features.dim=256"])
    assert cfg.model == "tiny-llama"
    assert cfg.select.method == "tsds" and cfg.select.ratio == 0.05
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.epochs == 2
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.features.dim == 256


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["select.lam=0.5", "generate.preset=strong"])
    assert load_config(_yaml(tmp_path, dump_config(cfg))) == cfg


@pytest.mark.parametrize("data,part", [
    ({"select": {"ratoi": 0.1}}, "unknown key 'select.ratoi'; did you mean 'select.ratio'?"),
    ({"selcet": {}}, "unknown key 'selcet'; did you mean 'select'?"),
    ({"train": {"learning_rate": 0.1}}, "unknown key 'train.learning_rate'"),
])
def test_unknown_key_names_closest(tmp_path, data, part):
    path = _yaml(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(path) and part in str(err.value)


@pytest.mark.parametrize("data,part", [
    ({"train": {"epochs": "three"}}, "train.epochs: wrong type str ('three'); expected int"),
    ({"train": {"epochs": 2.5}}, "train.epochs: wrong type float"),
    ({"train": {"bf16": "yes"}}, "train.bf16: wrong type str"),
    ({"features": {"batch_size": True}}, "features.batch_size: wrong type bool"),
    ({"select": {"method": "evosel"}}, "did you mean 'evoselect'"),
    ({"select": 3}, "select: wrong type int"),
    ({"features": {"target_modules": "q_proj"}}, "features.target_modules: wrong type str"),
])
def test_wrong_type(tmp_path, data, part):
    with pytest.raises(ConfigError) as err:
        load_config(_yaml(tmp_path, data))
    assert part in str(err.value)


@pytest.mark.parametrize("override,part", [
    ("select.ratio=0", "select.ratio: 0.0 is out of range; must be in (0, 1]"),
    ("select.ratio=1.5", "select.ratio: 1.5 is out of range"),
    ("select.ratio=-0.1", "out of range"),
    ("select.lam=2", "select.lam"),
    ("evolve.rounds=-1", "evolve.rounds"),
    ("train.lr=0", "train.lr"),
    ("generate.kind=pool", "generate.path: required"),
    ("select.ratoi=0.1", "did you mean 'select.ratio'"),
    ("select", "expected key=value"),
    ("model.name=x", "'model' has no sub-keys"),
])
def test_bad_override(override, part):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert part in str(err.value)


def test_validation_in_post_init():
    with pytest.raises(ConfigError, match="select.ratio"):
        SelectConfig(ratio=0.0)
    with pytest.raises(ConfigError, match="features.num_cpus"):
        FeaturesConfig(num_cpus=0)
    assert TrainConfig(lr=1).lr == 1.0


def test_invalid_yaml_names_line(tmp_path):
    path = _yaml(tmp_path, "model: x\nselect:\n  ratio: [0.1\n")
    with pytest.raises(ConfigError, match=r"job\.yaml:\d+: invalid YAML"):
        load_config(path)
