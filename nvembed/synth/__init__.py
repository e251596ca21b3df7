"""Synthetic training data: E5-mistral two-step generation and Gecko FRet LLM distillation.

Backends (:mod:`.llm`): :class:`TransformersLLM` (local causal LM, e.g. the SmolLM2 GGUF) and
:class:`OpenAIChatLLM` (any OpenAI-compatible server). Pipelines: :func:`run_e5`, :func:`run_fret`; both are
append-only and resumable (:mod:`.resume`) and write nvembed data specs (:mod:`.output`).
"""

from .e5 import E5Config, extract_json, run_e5
from .fret import FRetConfig, fuse, read_passages, run_fret
from .llm import (BaseLLM, LLMCapabilityError, LLMError, OpenAIChatLLM, TransformersLLM, build_llm,
                  smollm2_folder)
from .output import per_row_instruction_supported, write_specs
from .resume import JsonlLog, stable_id

__all__ = ["E5Config", "run_e5", "extract_json", "FRetConfig", "run_fret", "read_passages", "fuse", "BaseLLM",
           "TransformersLLM", "OpenAIChatLLM", "LLMError", "LLMCapabilityError", "build_llm", "smollm2_folder",
           "write_specs", "per_row_instruction_supported", "JsonlLog", "stable_id"]
