"""Training data: YAML specs -> task conversions -> weighted, sharded, resumable batches of :class:`Example`."""

from .batching import StageData, build_stage_data, resolve_spec_path
from .example import Example
from .spec import DataSpec, FieldsSpec, SourceSpec, SpecError, load_spec, parse_spec
from .tasks import TaskData

__all__ = ["Example", "DataSpec", "FieldsSpec", "SourceSpec", "SpecError", "load_spec", "parse_spec",
           "build_stage_data", "StageData", "TaskData", "resolve_spec_path"]
