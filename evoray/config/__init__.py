"""Typed configuration: one dataclass per stage, loaded from YAML, with ``key=value`` overrides.

A job's YAML file is the nested form of :class:`Config`::

    model: smollm2-135m
    select: {method: evoselect, ratio: 0.1}
    train: {lr: 2.0e-4, epochs: 3}

Every field is type-checked and range-checked in ``__post_init__``, so a config built in Python
is as safe as one read from a file. An unknown key is rejected with the closest valid name.
Integers are accepted where a float is expected, and so are strings such as ``"1e-4"`` (YAML 1.1,
which PyYAML follows, reads ``1e-4`` without a dot as a string).
"""

from evoray.config.load import (
    apply_override,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from evoray.config.sections import (
    GENERATORS,
    SELECT_METHODS,
    Config,
    EvolveConfig,
    FeaturesConfig,
    GenerateConfig,
    SelectConfig,
    SweepConfig,
    TrainConfig,
)
from evoray.errors import ConfigError

__all__ = [
    "Config", "FeaturesConfig", "SelectConfig", "TrainConfig", "GenerateConfig", "EvolveConfig",
    "SweepConfig", "ConfigError", "SELECT_METHODS", "GENERATORS", "load_config", "parse_overrides",
    "apply_override", "config_from_dict", "config_to_dict", "dump_config",
]
