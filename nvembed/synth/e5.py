"""E5-mistral synthetic data (Wang et al. 2024, arXiv 2401.00368 §3.1): two-step prompting.

Asymmetric types (``short-long``, ``long-short``, ``short-short``, ``long-long``):
  1. *brainstorm*: the LLM lists tasks of that type (JSON list of one-sentence task definitions);
  2. *generate*: per task, the LLM writes one example (query, positive, hard negative) as a JSON object, with
     placeholders (query length, clarity, difficulty, language, ...) sampled by a seeded RNG.
Symmetric types (``sts``, ``bitext``) skip brainstorming (fixed instructions, two scenarios each in E5).

Outputs that are not valid JSON (or miss keys) are discarded *and counted*; exact duplicates (same query and
positive) are removed. Everything is append-only and keyed by stable ids, so a killed run restarts where it stopped.

Files in ``out_dir``: ``brainstorm.jsonl`` (one record per brainstorm call), ``generations.jsonl`` (one record per
example attempt, with its status), ``examples.jsonl`` (valid unique rows ``{id, query, positive, negatives,
instruction, type, language, symmetric}``), ``stats.json`` and ``specs/`` (data specs, see :mod:`.output`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .llm import BaseLLM
from .loop import Outcome, SynthRun, generate_work
from .output import write_specs
from .parse import extract_json, norm_task, parse_example, parse_task_list
from .prompts import (ASYMMETRIC, SYMMETRIC, SYMMETRIC_INSTRUCTIONS, TYPES, brainstorm_prompt, example_prompt,
                      language_table, sample_placeholders)
from .resume import JsonlLog, stable_id

__all__ = ["E5Config", "run_e5", "read_tasks_file", "extract_json", "TYPES", "ASYMMETRIC", "SYMMETRIC"]


@dataclass
class E5Config:
    types: Sequence[str] = ASYMMETRIC + ("sts",)
    num_tasks: int = 20
    """Tasks per asymmetric type; for symmetric types, ``num_tasks * examples_per_task`` examples are written."""
    examples_per_task: int = 1
    tasks_per_prompt: int = 20
    """Tasks asked for in one brainstorm call (``ceil(num_tasks / tasks_per_prompt)`` calls per type)."""
    tasks: Dict[str, List[str]] = field(default_factory=dict)
    """Given task definitions per type: that type's brainstorming is skipped."""
    languages: Any = "English"
    """A language, a list (uniform), a {language: weight} dict, or ``"xlmr"`` (weighted XLM-R subset)."""
    seed: int = 0
    temperature: float = 1.0
    max_new_tokens_brainstorm: int = 1024
    max_new_tokens_example: int = 1024
    chunk_size: int = 32
    """Prompts sent to the backend at once (and written out together)."""
    limit: Optional[int] = None
    """Stop after this many LLM calls in this run (brainstorm + examples); a later run continues."""
    stages: Sequence[str] = ("stage1", "stage2")
    spec_mode: str = "auto"
    name: str = "e5_synthetic"


def read_tasks_file(path: str | Path) -> Dict[str, List[str]]:
    """``--tasks-file``: JSON ``{type: [task, ...]}``; anything else is a ``SpecError`` naming the file."""
    from nvembed.data.spec import SpecError

    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(tasks, dict) or not all(isinstance(v, list) and all(isinstance(t, str) for t in v)
                                              for v in tasks.values()):
        raise SpecError(f"{path}: must be a JSON object {{type: [task, ...]}}")
    bad = [k for k in tasks if k not in TYPES]
    if bad:
        raise SpecError(f"{path}: unknown types {bad}; valid: {', '.join(TYPES)}")
    return tasks


def _brainstorm_items(cfg: E5Config) -> List[Dict[str, Any]]:
    return [{"id": stable_id("brainstorm", kind, call, cfg.seed), "type": kind, "call": call}
            for kind in cfg.types if kind not in SYMMETRIC and not cfg.tasks.get(kind)
            for call in range(math.ceil(cfg.num_tasks / max(1, cfg.tasks_per_prompt)))]


def _parse_brainstorm(it: Dict[str, Any], text: str) -> Outcome:
    try:
        row = {**it, "status": "ok", "tasks": parse_task_list(text)}
    except ValueError as e:
        row = {**it, "status": str(e), "tasks": [], "raw": text[:2000]}
    return Outcome(row["status"], (row,))


def _tasks_by_type(cfg: E5Config, bs_log: JsonlLog, bs_ids: set) -> Dict[str, List[str]]:
    """Given tasks, else the brainstormed ones in call order, de-duplicated case-insensitively, capped."""
    out: Dict[str, List[str]] = {}
    for kind in cfg.types:
        if kind in SYMMETRIC:
            continue
        if cfg.tasks.get(kind):
            out[kind] = list(dict.fromkeys(norm_task(t) for t in cfg.tasks[kind] if norm_task(t)))
            continue
        seen, lst = set(), []
        recs = sorted((r for r in bs_log.rows if r.get("type") == kind and r.get("status") == "ok"
                       and r["id"] in bs_ids), key=lambda r: r["call"])
        for t in (t for r in recs for t in r["tasks"]):
            if t.lower() not in seen:
                seen.add(t.lower())
                lst.append(t)
        out[kind] = lst[:cfg.num_tasks]
    return out


def _example_items(cfg: E5Config, tasks_by_type: Dict[str, List[str]]) -> List[Dict[str, Any]]:
    langs = language_table(cfg.languages)
    items = []
    for kind in cfg.types:
        keys = ([(stable_id("example", kind, k, cfg.seed), None) for k in range(cfg.num_tasks * cfg.examples_per_task)]
                if kind in SYMMETRIC else
                [(stable_id("example", kind, task, k, cfg.seed), task) for task in tasks_by_type.get(kind, [])
                 for k in range(cfg.examples_per_task)])
        for iid, task in keys:
            # placeholders from the item id: a resumed run samples the same values
            ph = sample_placeholders(kind, random.Random(f"{cfg.seed}:{iid}"), langs)
            items.append({"id": iid, "type": kind, "task": task, "placeholders": ph})
    return items


def pair_key(query: str, positive: str) -> bytes:
    """A 16-byte digest of a (query, positive) pair: what the duplicate check keeps instead of the texts."""
    return hashlib.blake2b(json.dumps([query, positive], ensure_ascii=False).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def _example_parser(seen_pairs: set) -> Callable[[Dict[str, Any], str], Outcome]:
    """Parse one example; records (example row or None, attempt record). ``seen_pairs`` (:func:`pair_key` of the
    rows so far) is shared across calls."""
    def parse(it: Dict[str, Any], text: str) -> Outcome:
        kind, ph = it["type"], it["placeholders"]
        instruction = it["task"] if kind in ASYMMETRIC else SYMMETRIC_INSTRUCTIONS[kind]
        rec = {"id": it["id"], "type": kind, "task": instruction, "placeholders": ph}
        row = None
        try:
            ex = parse_example(kind, text)
            key = pair_key(ex["query"], ex["positive"])
            if ex["query"] == ex["positive"]:
                status = "query_equals_positive"
            elif key in seen_pairs:
                status = "duplicate"
            else:
                status = "ok"
                seen_pairs.add(key)
                negs = [ex["negative"]] if ex["negative"] not in (ex["positive"], ex["query"]) else []
                lang = ph["language"] if kind != "bitext" else f"{ph['src_lang']}-{ph['tgt_lang']}"
                row = {"id": it["id"], "query": ex["query"], "positive": ex["positive"], "negatives": negs,
                       "instruction": instruction, "type": kind, "language": lang, "symmetric": kind in SYMMETRIC}
        except ValueError as e:
            status = str(e)
        rec["status"] = status
        if status in ("invalid_json", "missing_keys"):
            rec["raw"] = text[:2000]
        return Outcome(status, (row, rec))  # the example is written before its attempt record: never lost

    return parse


def run_e5(llm: BaseLLM, out_dir: str | Path, cfg: E5Config, *, log: Callable[[str], None] = print,
           show_progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) the pipeline; returns the stats (also written to ``out_dir/stats.json``)."""
    bad = [t for t in cfg.types if t not in TYPES]
    if bad:
        raise ValueError(f"unknown types {bad}; valid: {', '.join(TYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run = SynthRun(llm, out, limit=cfg.limit, show_progress=show_progress)

    # -- step 1: brainstorm -----------------------------------------------------------------------------------
    items = _brainstorm_items(cfg)
    with JsonlLog(out / "brainstorm.jsonl") as bs_log:
        run.phase("brainstorm", items, [bs_log],
                  generate_work(llm, lambda it: brainstorm_prompt(it["type"], cfg.tasks_per_prompt),
                                _parse_brainstorm, max_new_tokens=cfg.max_new_tokens_brainstorm,
                                temperature=cfg.temperature, seed=cfg.seed),
                  chunk_size=cfg.chunk_size, prefix="brainstorm_")
    bs_ids = {it["id"] for it in items}
    tasks_by_type = _tasks_by_type(cfg, bs_log, bs_ids)

    # -- step 2: examples -------------------------------------------------------------------------------------
    gen_items = _example_items(cfg, tasks_by_type)
    with JsonlLog(out / "generations.jsonl") as gen_log, JsonlLog(out / "examples.jsonl") as ex_log:
        parse = _example_parser({pair_key(r["query"], r["positive"]) for r in ex_log.rows})
        run.phase("examples", gen_items, [ex_log, gen_log],
                  generate_work(llm, lambda it: example_prompt(it["type"], it["task"], it["placeholders"]), parse,
                                max_new_tokens=cfg.max_new_tokens_example, temperature=cfg.temperature,
                                seed=cfg.seed),
                  chunk_size=cfg.chunk_size, prefix="example_")

    # -- stats + specs ----------------------------------------------------------------------------------------
    ids = {it["id"] for it in gen_items}
    status_all = Counter(r["status"] for r in gen_log.rows if r["id"] in ids)
    bs_all = Counter(r["status"] for r in bs_log.rows if r["id"] in bs_ids)
    by_type = Counter(r["type"] for r in ex_log.rows if r["id"] in ids)
    n_rows = sum(by_type.values())
    spec_paths = write_specs(out, (r for r in ex_log.rows if r["id"] in ids), name=cfg.name, stages=cfg.stages,
                             mode=cfg.spec_mode,
                             description=f"E5-style synthetic data from {llm.name} (seed {cfg.seed})") if n_rows else []
    stats = {
        "model": llm.name,
        "brainstorm": {"calls_total": len(items), "done": sum(bs_all.values()), **dict(bs_all)},
        "tasks": {k: len(v) for k, v in tasks_by_type.items()},
        "examples": {"attempts_total": len(gen_items), "done": sum(status_all.values()), **dict(status_all)},
        "rows": n_rows,
        "rows_by_type": dict(by_type),
        "this_run": dict(run.counts),
        "this_run_seconds": round(time.time() - t0, 2),
        "complete": sum(bs_all.values()) == len(items) and sum(status_all.values()) == len(gen_items),
        "llm": dict(getattr(llm, "stats", {})),
        "specs": [str(p) for p in spec_paths],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    log(f"[e5] {stats['rows']} rows; brainstorm {stats['brainstorm']}; examples {stats['examples']}; "
        f"this run {dict(run.counts)} in {stats['this_run_seconds']}s")
    if not n_rows:
        log("[e5] no valid rows yet: no spec written")
    return stats
