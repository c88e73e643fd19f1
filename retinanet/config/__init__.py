"""Typed configuration: dataclasses (`schema`) loaded from YAML files with `_base_` inheritance
and `key=value` command-line overrides (`loading`), then checked (`validation`). An unknown key
or a wrong value is an error that names the key and the file (or override) it came from.

A recipe is a short YAML file that names its base and overrides a few keys:

    _base_: retinanet_R50_FPN_1x.yaml
    model:
      backbone:
        depth: 101
"""

from .loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    parse_override,
)
from .schema import (
    AnchorConfig,
    BackboneConfig,
    Config,
    DataConfig,
    DatasetSplitConfig,
    EvalConfig,
    FPNConfig,
    HeadConfig,
    InferenceConfig,
    InputConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    SyntheticDataConfig,
    TrainConfig,
)
from .validation import ConfigError, config_differences, config_value, validate

__all__ = [
    "AnchorConfig",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetSplitConfig",
    "EvalConfig",
    "FPNConfig",
    "HeadConfig",
    "InferenceConfig",
    "InputConfig",
    "LossConfig",
    "MatcherConfig",
    "ModelConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "config_value",
    "load_config",
    "parse_override",
    "validate",
]
