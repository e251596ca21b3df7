"""MTEB-compatible wrapper around a :class:`~nvembed.eval.encoders.TextEncoder`.

Duck-typed so ``mteb`` itself is not a dependency: MTEB (v1.x) calls
``model.encode(sentences, task_name=..., prompt_type=PromptType.query|passage|None, **kwargs)``; MTEB 2.x passes a
``DataLoader`` of ``{"text": [...]}`` batches and ``task_metadata=`` / ``prompt_type=``. Both are accepted.

Instruction choice (NV-Embed convention):
* ``prompt_type`` "query" -> the task's instruction;
* ``prompt_type`` "document"/"passage" -> no instruction;
* ``prompt_type`` None (symmetric tasks: STS, classification, clustering) -> the task's instruction.
Instructions come from ``instructions[task_name]``, else ``default_instruction`` (None = plain text).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np

_DOC = {"document", "passage", "corpus", "doc"}


def _prompt_type_str(pt) -> Optional[str]:
    if pt is None:
        return None
    return str(getattr(pt, "value", pt)).lower()


def _flatten(sentences) -> List[str]:
    if isinstance(sentences, str):
        return [sentences]
    if isinstance(sentences, (list, tuple)) and all(isinstance(s, str) for s in sentences):
        return list(sentences)
    out: List[str] = []
    for item in sentences:  # DataLoader / iterable of batches (MTEB 2.x) or of strings
        if isinstance(item, Mapping):
            out.extend(item["text"])
        elif isinstance(item, str):
            out.append(item)
        else:
            out.extend(item)
    return out


class MTEBEncoderWrapper:
    def __init__(self, encoder, *, instructions: Optional[Dict[str, str]] = None,
                 default_instruction: Optional[str] = None, batch_size: int = 32, name: Optional[str] = None):
        self.encoder = encoder
        self.instructions = dict(instructions or {})
        self.default_instruction = default_instruction
        self.batch_size = batch_size
        self.model_name = name or getattr(encoder, "name", "nvembed")
        self.calls: List[Dict[str, Any]] = []  # (task, prompt_type, instruction, n) per call, for inspection

    def instruction_for(self, task_name: Optional[str], prompt_type=None) -> Optional[str]:
        pt = _prompt_type_str(prompt_type)
        if pt in _DOC:
            return None
        if task_name is not None and task_name in self.instructions:
            return self.instructions[task_name]
        return self.default_instruction

    def encode(self, sentences, *, task_name: Optional[str] = None, prompt_type=None, **kwargs) -> np.ndarray:
        if task_name is None and kwargs.get("task_metadata") is not None:
            task_name = getattr(kwargs["task_metadata"], "name", None)
        texts = _flatten(sentences)
        ins = self.instruction_for(task_name, prompt_type)
        self.calls.append({"task": task_name, "prompt_type": _prompt_type_str(prompt_type), "instruction": ins,
                           "n": len(texts)})
        return self.encoder.encode(texts, instruction=ins, batch_size=kwargs.get("batch_size", self.batch_size),
                                   show_progress=bool(kwargs.get("show_progress_bar", False)))

    # MTEB 1.x retrieval may call these on older versions.
    def encode_queries(self, queries: List[str], **kwargs) -> np.ndarray:
        return self.encode(queries, prompt_type="query", **kwargs)

    def encode_corpus(self, corpus, **kwargs) -> np.ndarray:
        if corpus and isinstance(corpus[0], Mapping):
            corpus = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in corpus]
        return self.encode(list(corpus), prompt_type="document", **kwargs)

    def similarity(self, a, b) -> np.ndarray:
        return np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32).T
