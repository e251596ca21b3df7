"""Synthetic training data: E5-mistral two-step generation and Gecko FRet LLM distillation.

Backends (:mod:`.llm`): :class:`TransformersLLM` (local causal LM, e.g. the SmolLM2 GGUF) and
:class:`OpenAIChatLLM` (any OpenAI-compatible server). Pipelines: :func:`run_e5`, :func:`run_fret`, both driven by
the one resumable chunked LLM-call loop of :mod:`.loop` (append-only outputs keyed by stable ids, :mod:`.resume`);
prompts live in :mod:`.prompts`, the parsing of what the LLM wrote in :mod:`.parse`, FRet's passage collection on
disk in :mod:`.passages`; both write nvembed data specs (:mod:`.output`).
"""

from .e5 import E5Config, run_e5
from .fret import FRetConfig, fuse, run_fret
from .llm import (BaseLLM, LLMCapabilityError, LLMError, OpenAIChatLLM, TransformersLLM, build_llm,
                  smollm2_folder)
from .loop import Outcome, SynthRun
from .output import per_row_instruction_supported, write_specs
from .parse import extract_json
from .passages import PassagePool, read_passages
from .resume import JsonlLog, stable_id

__all__ = ["E5Config", "run_e5", "extract_json", "FRetConfig", "run_fret", "read_passages", "PassagePool", "fuse",
           "BaseLLM", "TransformersLLM", "OpenAIChatLLM", "LLMError", "LLMCapabilityError", "build_llm",
           "smollm2_folder", "SynthRun", "Outcome", "write_specs", "per_row_instruction_supported", "JsonlLog",
           "stable_id"]
