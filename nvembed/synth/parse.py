"""Reading what the LLM wrote: the tolerant JSON extraction and the field checks of each pipeline.

Every parser raises ``ValueError`` with a status word (``invalid_json``: no JSON value of the wanted type;
``missing_keys``: a wanted key is absent or empty); the pipelines record that word as the item's status.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Dict, List, Sequence

from .prompts import KEYS

_FENCE = re.compile(r"```(?:json|JSON|python)?\s*\n?(.*?)```", re.S)


def extract_json(text: str, want: type = dict) -> Any:
    """The first JSON value of type ``want`` in model text: whole text, a ```json fence, or the first ``{...}`` /
    ``[...]`` that parses. Lists may also be Python literals (E5 asks for "a python list"). Raises ValueError."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty output")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    opener = "{" if want is dict else "["
    for cand in candidates:
        cand = cand.strip()
        try:
            v = json.loads(cand)
            if isinstance(v, want):
                return v
        except json.JSONDecodeError:
            pass
        for m in re.finditer(re.escape(opener), cand):
            try:
                v, _ = dec.raw_decode(cand[m.start():])
            except json.JSONDecodeError:
                if want is list:
                    end = cand.find("]", m.start())
                    try:
                        v = ast.literal_eval(cand[m.start():end + 1]) if end > 0 else None
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        continue
                else:
                    continue
            if isinstance(v, want):
                return v
    raise ValueError(f"no JSON {want.__name__} found")


def json_fields(text: str, keys: Sequence[str], *, numbers: bool = False, squash_space: bool = False) -> List[str]:
    """The non-empty string values of ``keys`` in the first JSON object of ``text``, stripped (``squash_space``:
    inner whitespace runs become one space; ``numbers``: a number counts as its text)."""
    try:
        obj = extract_json(text, dict)
    except ValueError:
        raise ValueError("invalid_json") from None
    vals = []
    for k in keys:
        v = obj.get(k)
        if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError("missing_keys")
        vals.append(" ".join(v.split()) if squash_space else v.strip())
    return vals


def norm_task(t: str) -> str:
    """A brainstormed task without list markers (``- ``, ``1. ``) and with single spaces."""
    return re.sub(r"\s+", " ", t.strip().lstrip("-*0123456789. ").strip()).rstrip()


def parse_task_list(text: str) -> List[str]:
    """E5 step 1: the task definitions of a brainstorm reply (a JSON or Python list of strings)."""
    try:
        lst = extract_json(text, list)
    except ValueError:
        raise ValueError("invalid_json") from None
    tasks = [norm_task(t) for t in lst if isinstance(t, str) and norm_task(t)]
    if not tasks:
        raise ValueError("invalid_json")
    return tasks


def parse_example(kind: str, text: str) -> Dict[str, str]:
    """E5 step 2: (query, positive, negative) strings of a ``kind`` example, read under that type's JSON keys."""
    q, p, n = json_fields(text, KEYS[kind], numbers=True)
    return {"query": q, "positive": p, "negative": n}


def parse_task_query(text: str) -> Dict[str, str]:
    """FRet step 1: the ``{task, query}`` written for a seed passage."""
    task, query = json_fields(text, ("task", "query"), squash_space=True)
    return {"task": task, "query": query}
