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

import ast
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .llm import BaseLLM, check_reachable
from .output import write_specs
from .resume import JsonlLog, progress, stable_id

ASYMMETRIC = ("short-long", "long-short", "short-short", "long-long")
SYMMETRIC = ("sts", "bitext")
TYPES = ASYMMETRIC + SYMMETRIC

# ---------------------------------------------------------------------------------------------------------------
# placeholders ([E5] §3.1 and App. C; values as in the paper's templates)
# ---------------------------------------------------------------------------------------------------------------
QUERY_TYPE = ["extremely long-tail", "long-tail", "common"]
QUERY_LENGTH = ["less than 5 words", "5 to 15 words", "at least 10 words"]
CLARITY = ["clear", "understandable with some effort", "ambiguous"]
NUM_WORDS = [50, 100, 200, 300, 400, 500]
DIFFICULTY = ["high school", "college", "PhD"]
UNIT = ["sentence", "phrase", "passage"]
HIGH_SCORE = ["4", "4.5", "5"]
LOW_SCORE = ["2.5", "3", "3.5"]
# A subset of the XLM-R languages, weighted towards high-resource ones (E5 samples the XLM-R list that way).
XLMR_LANGUAGES = {
    "English": 30, "Russian": 6, "Chinese": 5, "German": 5, "French": 5, "Spanish": 5, "Japanese": 4, "Italian": 3,
    "Portuguese": 3, "Dutch": 2, "Polish": 2, "Korean": 2, "Vietnamese": 2, "Persian": 2, "Turkish": 2,
    "Indonesian": 2, "Arabic": 2, "Swedish": 1, "Czech": 1, "Ukrainian": 1, "Hindi": 1, "Greek": 1, "Romanian": 1,
    "Hungarian": 1, "Danish": 1, "Finnish": 1, "Thai": 1, "Hebrew": 1, "Bengali": 0.5, "Tamil": 0.5, "Urdu": 0.5,
    "Swahili": 0.5, "Telugu": 0.5, "Marathi": 0.5, "Tagalog": 0.5, "Afrikaans": 0.5, "Catalan": 0.5,
    "Estonian": 0.5, "Latvian": 0.5, "Lithuanian": 0.5, "Slovenian": 0.5, "Serbian": 0.5, "Bulgarian": 0.5,
}

# ---------------------------------------------------------------------------------------------------------------
# prompt templates
# ---------------------------------------------------------------------------------------------------------------
_LIST_TAIL = ("Your output must always be a JSON list of strings only, with about {n} elements, and each element "
              "corresponds to a distinct task in one sentence. Do not explain yourself or output anything else. "
              "Be creative!")

BRAINSTORM = {
    "short-long": (
        "Brainstorm a list of potentially useful text retrieval tasks.\n\n"
        "Here are a few examples for your reference:\n"
        "- Provided a scientific claim as query, retrieve documents that help verify or refute the claim.\n"
        "- Search for documents that answer a FAQ-style query on children's nutrition.\n\n"
        "Please adhere to the following guidelines:\n"
        "- Specify what the query is, and what the desired documents are.\n"
        "- Each retrieval task should cover a wide range of queries, and should not be too specific.\n\n"),
    "long-short": (
        "Brainstorm a list of potentially useful text classification tasks.\n\n"
        "Please adhere to the following guidelines:\n"
        "- Tasks should cover a diverse range of domains and task types.\n\n"),
    "short-short": (
        "Brainstorm a list of text matching tasks where both the queries and the groundtruth documents are very "
        "short (one or two sentences, even a short phrase).\n\n"
        "Here are a few examples:\n"
        "- Given a scientific paper title, retrieve the title of papers that cite the given paper.\n"
        "- Match a word with its definition.\n"
        "- Provided a notable person's name, identify their occupation or achievement.\n\n"),
    "long-long": (
        "Brainstorm a list of text matching tasks where the queries are long documents.\n\n"
        "Here are a few examples:\n"
        "- Given a document that supports a debatable argument, find another document that contains opposite "
        "arguments.\n"
        "- Provided a lengthy business proposal, retrieve competitive business strategies in the same industry.\n\n"),
}

GENERATE = {
    "short-long": (
        "You have been assigned a retrieval task: {task}\n"
        "Your mission is to write one text retrieval example for this task in JSON format. The JSON object must "
        "contain the following keys:\n"
        '- "user_query": a string, a random user search query specified by the retrieval task.\n'
        '- "positive_document": a string, a relevant document for the user query.\n'
        '- "hard_negative_document": a string, a hard negative document that only appears relevant to the query.\n\n'
        "Please adhere to the following guidelines:\n"
        '- The "user_query" should be {query_type}, {query_length}, {clarity}, and diverse in topic.\n'
        "- All documents must be created independent of the query. Avoid copying the query verbatim. It's "
        'acceptable if some parts of the "positive_document" are not topically related to the query.\n'
        "- All documents should be at least {num_words} words long.\n"
        '- The "hard_negative_document" contains some useful information, but it should be less useful or '
        'comprehensive compared to the "positive_document".\n'
        "- Both the query and documents should be in {language}.\n"
        "- Do not provide any explanation in any document on why it is relevant or not relevant to the query.\n"
        "- Both the query and documents require {difficulty} level education to understand.\n\n"
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "long-short": (
        "You have been assigned a text classification task: {task}\n"
        "Your mission is to write one text classification example for this task in JSON format. The JSON object "
        "must contain the following keys:\n"
        '- "input_text": a string, the input text specified by the classification task.\n'
        '- "label": a string, the correct label of the input text.\n'
        '- "misleading_label": a string, an incorrect label that is related to the task.\n\n'
        "Please adhere to the following guidelines:\n"
        '- The "input_text" should be at least {num_words} words and diverse in expression.\n'
        '- The "misleading_label" must be a valid label for the given task, but not as appropriate as the "label" '
        'for the "input_text".\n'
        "- The values for all fields should be in {language}.\n"
        "- Avoid including the values of the \"label\" and \"misleading_label\" fields in the \"input_text\", that "
        "would make the task too easy.\n"
        '- The "input_text" is {clarity} and requires {difficulty} level education to comprehend.\n\n'
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "short-short": (
        "You have been assigned a text matching task: {task}\n"
        "Your mission is to write one example for this task in JSON format. The JSON object must contain the "
        "following keys:\n"
        '- "input": a string, a random input specified by the task.\n'
        '- "positive_document": a string, a relevant document for the "input" according to the task.\n'
        '- "hard_negative_document": a string, a document that only appears relevant to the "input".\n\n'
        "Please adhere to the following guidelines:\n"
        "- The values of all fields should be in {language}.\n"
        '- Both the "input" and "positive_document" should be very short (a sentence or a phrase), avoid '
        "substantial word overlaps, otherwise the task would be too easy.\n"
        '- The "input" is {query_length}, {clarity}, and requires {difficulty} level education to comprehend.\n\n'
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "long-long": (
        "You have been assigned a text matching task: {task}\n"
        "Your mission is to write one example for this task in JSON format. The JSON object must contain the "
        "following keys:\n"
        '- "input": a string, a random input specified by the task.\n'
        '- "positive_document": a string, a relevant document for the "input" according to the task.\n'
        '- "hard_negative_document": a string, a document that only appears relevant to the "input".\n\n'
        "Please adhere to the following guidelines:\n"
        "- The values of all fields should be in {language}.\n"
        '- Both the "input" and "positive_document" should be long documents (at least {num_words} words), avoid '
        "substantial word overlaps, otherwise the task would be too easy.\n"
        '- The "input" is {clarity} and requires {difficulty} level education to comprehend.\n\n'
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "sts": (
        "Write a {unit} triple with varying semantic similarity scores in JSON format. The semantic similarity "
        "score ranges from 1 to 5, with 1 denotes least similar and 5 denotes most similar.\n\n"
        "Please adhere to the following guidelines:\n"
        '- The keys in JSON are "S1", "S2", and "S3", the values are all strings in {language}, do not add any '
        "other keys.\n"
        '- There should be some word overlaps between all three {unit}s.\n'
        '- The similarity score between S1 and S2 should be {high_score}.\n'
        '- The similarity score between S1 and S3 should be {low_score}.\n'
        '- The {unit}s require {difficulty} level education to understand and should be diverse in terms of topic '
        "and length.\n\n"
        "Your output must be a JSON object only with three keys \"S1\", \"S2\" and \"S3\", do not explain yourself "
        "or output anything else. Be creative!"),
    "bitext": (
        "Write a {unit} triple with one {unit} in {src_lang} and two {unit}s in {tgt_lang} in JSON format.\n\n"
        "Please adhere to the following guidelines:\n"
        '- The keys in JSON are "S1", "S2", and "S3", the values are all strings, do not add any other keys.\n'
        '- S1 is in {src_lang}; S2 is its translation in {tgt_lang} (similarity score {high_score} out of 5).\n'
        '- S3 is in {tgt_lang}, shares some words with S2 but is not a translation of S1 (similarity score '
        "{low_score} out of 5).\n"
        "- The {unit}s require {difficulty} level education to understand and should be diverse in topic.\n\n"
        "Your output must be a JSON object only with three keys \"S1\", \"S2\" and \"S3\", do not explain yourself "
        "or output anything else. Be creative!"),
}

# (query key, positive key, negative key) of each type's JSON object
KEYS = {
    "short-long": ("user_query", "positive_document", "hard_negative_document"),
    "long-short": ("input_text", "label", "misleading_label"),
    "short-short": ("input", "positive_document", "hard_negative_document"),
    "long-long": ("input", "positive_document", "hard_negative_document"),
    "sts": ("S1", "S2", "S3"),
    "bitext": ("S1", "S2", "S3"),
}
SYMMETRIC_INSTRUCTIONS = {
    "sts": "Retrieve semantically similar text",
    "bitext": "Retrieve parallel sentences",
}


# ---------------------------------------------------------------------------------------------------------------
# JSON extraction
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------------------------
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


def _language_table(languages: Any) -> Dict[str, float]:
    if languages == "xlmr":
        return dict(XLMR_LANGUAGES)
    if isinstance(languages, str):
        return {languages: 1.0}
    if isinstance(languages, dict):
        return {str(k): float(v) for k, v in languages.items()}
    return {str(k): 1.0 for k in languages}


def sample_placeholders(kind: str, rng: random.Random, languages: Dict[str, float]) -> Dict[str, Any]:
    names, weights = list(languages), list(languages.values())
    p: Dict[str, Any] = {
        "query_type": rng.choice(QUERY_TYPE), "query_length": rng.choice(QUERY_LENGTH),
        "clarity": rng.choice(CLARITY), "num_words": rng.choice(NUM_WORDS), "difficulty": rng.choice(DIFFICULTY),
        "language": rng.choices(names, weights)[0], "unit": rng.choice(UNIT), "high_score": rng.choice(HIGH_SCORE),
        "low_score": rng.choice(LOW_SCORE),
    }
    if kind == "bitext":
        src = rng.choices(names, weights)[0]
        others = [n for n in names if n != src] or ["English" if src != "English" else "French"]
        ow = [languages.get(n, 1.0) for n in others]
        p.update(src_lang=src, tgt_lang=rng.choices(others, ow)[0])
    return p


def brainstorm_prompt(kind: str, n: int) -> str:
    return BRAINSTORM[kind] + _LIST_TAIL.format(n=n)


def example_prompt(kind: str, task: Optional[str], placeholders: Dict[str, Any]) -> str:
    return GENERATE[kind].format(task=task or "", **placeholders)


def parse_example(kind: str, text: str) -> Dict[str, str]:
    """(query, positive, negative) strings from the model text; ValueError ``invalid_json`` / ``missing_keys``."""
    try:
        obj = extract_json(text, dict)
    except ValueError:
        raise ValueError("invalid_json") from None
    qk, pk, nk = KEYS[kind]
    vals = []
    for k in (qk, pk, nk):
        v = obj.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError("missing_keys")
        vals.append(v.strip())
    return {"query": vals[0], "positive": vals[1], "negative": vals[2]}


def _norm_task(t: str) -> str:
    return re.sub(r"\s+", " ", t.strip().lstrip("-*0123456789. ").strip()).rstrip()


def _chunks(items: List[Any], n: int):
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


def run_e5(llm: BaseLLM, out_dir: str | Path, cfg: E5Config, *, log: Callable[[str], None] = print,
           show_progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) the pipeline; returns the stats (also written to ``out_dir/stats.json``)."""
    bad = [t for t in cfg.types if t not in TYPES]
    if bad:
        raise ValueError(f"unknown types {bad}; valid: {', '.join(TYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    langs = _language_table(cfg.languages)
    t0 = time.time()
    budget = [cfg.limit if cfg.limit is not None else math.inf]
    run_stats = Counter()

    # -- step 1: brainstorm -----------------------------------------------------------------------------------
    bs_log = JsonlLog(out / "brainstorm.jsonl")
    items = []
    for kind in cfg.types:
        if kind in SYMMETRIC or cfg.tasks.get(kind):
            continue
        for call in range(math.ceil(cfg.num_tasks / max(1, cfg.tasks_per_prompt))):
            iid = stable_id("brainstorm", kind, call, cfg.seed)
            items.append({"id": iid, "type": kind, "call": call})
    pending = [it for it in items if it["id"] not in bs_log]
    if pending and budget[0] > 0:
        bar = progress(len(items), "brainstorm", len(items) - len(pending), disable=not show_progress)
        pending = pending[:int(min(len(pending), budget[0]))]
        for chunk in _chunks(pending, cfg.chunk_size):
            prompts = [brainstorm_prompt(it["type"], cfg.tasks_per_prompt) for it in chunk]
            texts = llm.generate(prompts, cfg.max_new_tokens_brainstorm, cfg.temperature,
                                 seed=int(stable_id(cfg.seed, chunk[0]["id"])[:8], 16))
            rows = []
            for it, text in zip(chunk, texts):
                budget[0] -= 1
                if not text:
                    run_stats["brainstorm_failed_request"] += 1
                    continue  # not recorded: retried by the next run
                try:
                    lst = extract_json(text, list)
                    tasks = [_norm_task(t) for t in lst if isinstance(t, str) and _norm_task(t)]
                    status = "ok" if tasks else "invalid_json"
                except ValueError:
                    tasks, status = [], "invalid_json"
                row = {**it, "status": status, "tasks": tasks}
                if status != "ok":
                    row["raw"] = text[:2000]
                rows.append(row)
                run_stats[f"brainstorm_{status}"] += 1
            bs_log.append(rows)
            check_reachable(llm, out)  # endpoint down: stop now, what succeeded is saved
            bar.update(len(chunk))
        bar.close()
    bs_log.close()

    tasks_by_type: Dict[str, List[str]] = {}
    for kind in cfg.types:
        if kind in SYMMETRIC:
            continue
        if cfg.tasks.get(kind):
            given = [_norm_task(t) for t in cfg.tasks[kind] if _norm_task(t)]
            tasks_by_type[kind] = list(dict.fromkeys(given))
            continue
        seen, lst = set(), []
        recs = sorted((r for r in bs_log.rows if r.get("type") == kind and r.get("status") == "ok"
                       and r["id"] in {it["id"] for it in items}), key=lambda r: r["call"])
        for r in recs:
            for t in r["tasks"]:
                if t.lower() not in seen:
                    seen.add(t.lower())
                    lst.append(t)
        tasks_by_type[kind] = lst[:cfg.num_tasks]

    # -- step 2: examples -------------------------------------------------------------------------------------
    gen_items = []
    for kind in cfg.types:
        if kind in SYMMETRIC:
            for k in range(cfg.num_tasks * cfg.examples_per_task):
                gen_items.append({"id": stable_id("example", kind, k, cfg.seed), "type": kind, "task": None})
        else:
            for task in tasks_by_type.get(kind, []):
                for k in range(cfg.examples_per_task):
                    gen_items.append({"id": stable_id("example", kind, task, k, cfg.seed), "type": kind,
                                      "task": task})
    gen_log = JsonlLog(out / "generations.jsonl")
    ex_log = JsonlLog(out / "examples.jsonl")
    seen_pairs = {(r["query"], r["positive"]) for r in ex_log.rows}
    pending = [it for it in gen_items if it["id"] not in gen_log]
    if pending and budget[0] > 0:
        bar = progress(len(gen_items), "examples", len(gen_items) - len(pending), disable=not show_progress)
        pending = pending[:int(min(len(pending), budget[0]))]
        for chunk in _chunks(pending, cfg.chunk_size):
            prompts = []
            for it in chunk:
                ph = sample_placeholders(it["type"], random.Random(f"{cfg.seed}:{it['id']}"), langs)
                it["placeholders"] = ph
                prompts.append(example_prompt(it["type"], it["task"], ph))
            texts = llm.generate(prompts, cfg.max_new_tokens_example, cfg.temperature,
                                 seed=int(stable_id(cfg.seed, chunk[0]["id"])[:8], 16))
            g_rows, e_rows = [], []
            for it, text in zip(chunk, texts):
                budget[0] -= 1
                if not text:
                    run_stats["example_failed_request"] += 1
                    continue
                kind = it["type"]
                instruction = it["task"] if kind in ASYMMETRIC else SYMMETRIC_INSTRUCTIONS[kind]
                rec = {"id": it["id"], "type": kind, "task": instruction, "placeholders": it["placeholders"]}
                try:
                    ex = parse_example(kind, text)
                    key = (ex["query"], ex["positive"])
                    if ex["query"] == ex["positive"]:
                        status = "query_equals_positive"
                    elif key in seen_pairs:
                        status = "duplicate"
                    else:
                        status = "ok"
                        seen_pairs.add(key)
                        negs = [ex["negative"]] if ex["negative"] not in (ex["positive"], ex["query"]) else []
                        lang = it["placeholders"]["language"] if kind != "bitext" else \
                            f"{it['placeholders']['src_lang']}-{it['placeholders']['tgt_lang']}"
                        e_rows.append({"id": it["id"], "query": ex["query"], "positive": ex["positive"],
                                       "negatives": negs, "instruction": instruction, "type": kind,
                                       "language": lang, "symmetric": kind in SYMMETRIC})
                except ValueError as e:
                    status = str(e)
                rec["status"] = status
                if status in ("invalid_json", "missing_keys"):
                    rec["raw"] = text[:2000]
                g_rows.append(rec)
                run_stats[f"example_{status}"] += 1
            ex_log.append(e_rows)  # examples first: a kill between the two writes re-generates, never loses
            gen_log.append(g_rows)
            check_reachable(llm, out)
            bar.update(len(chunk))
        bar.close()
    gen_log.close()
    ex_log.close()

    # -- stats + specs ----------------------------------------------------------------------------------------
    ids = {it["id"] for it in gen_items}
    status_all = Counter(r["status"] for r in gen_log.rows if r["id"] in ids)
    bs_ids = {it["id"] for it in items}
    bs_all = Counter(r["status"] for r in bs_log.rows if r["id"] in bs_ids)
    rows = [r for r in ex_log.rows if r["id"] in ids]
    spec_paths = write_specs(out, rows, name=cfg.name, stages=cfg.stages, mode=cfg.spec_mode,
                             description=f"E5-style synthetic data from {llm.name} (seed {cfg.seed})") if rows else []
    stats = {
        "model": llm.name,
        "brainstorm": {"calls_total": len(items), "done": sum(bs_all.values()), **dict(bs_all)},
        "tasks": {k: len(v) for k, v in tasks_by_type.items()},
        "examples": {"attempts_total": len(gen_items), "done": sum(status_all.values()), **dict(status_all)},
        "rows": len(rows),
        "rows_by_type": dict(Counter(r["type"] for r in rows)),
        "this_run": dict(run_stats),
        "this_run_seconds": round(time.time() - t0, 2),
        "complete": sum(bs_all.values()) == len(items) and sum(status_all.values()) == len(gen_items),
        "llm": dict(getattr(llm, "stats", {})),
        "specs": [str(p) for p in spec_paths],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    log(f"[e5] {stats['rows']} rows; brainstorm {stats['brainstorm']}; examples {stats['examples']}; "
        f"this run {dict(run_stats)} in {stats['this_run_seconds']}s")
    if not rows:
        log("[e5] no valid rows yet: no spec written")
    return stats
