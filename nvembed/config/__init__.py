"""Typed run configuration: the schema (``schema.py``: dataclasses with a docstring per field, ranges, choices) and
its loading (``load.py``: OmegaConf merge, key/type/choice/range checks, ``describe`` for ``--help-config``)."""

from .load import ConfigError, check_key, describe, model_from_dict, to_dict, validate
from .schema import (CHOICES, MISSING, EvalConfig, ExcludedDataset, LoggingConfig, LoraConfig, LossConfig, ModelConfig,
                     PoolingConfig, Range, RunConfig, StageConfig, ranged)

__all__ = ["CHOICES", "MISSING", "ConfigError", "EvalConfig", "ExcludedDataset", "LoggingConfig", "LoraConfig",
           "LossConfig", "ModelConfig", "PoolingConfig", "Range", "RunConfig", "StageConfig", "check_key", "describe",
           "model_from_dict", "ranged", "to_dict", "validate"]
