"""Evaluation suites: a YAML list of tasks, run against one encoder, reported as a table and a bar chart.

Suite YAML (paths are relative to the YAML file)::

    name: demo
    batch_size: 32            # optional default for every task
    tasks:
      - {name: cisi, type: retrieval, path: beir/cisi, instruction: "...", max_queries: 40, max_corpus: 280,
         max_doc_chars: 1000}
      - {name: stsb, type: sts, path: sts/stsbenchmark-test.jsonl, instruction: "...", max_pairs: 240}
      - {name: mpqa, type: classification, train: classification/mpqa/train.jsonl,
         test: classification/mpqa/test.jsonl, instruction: "...", max_train: 100, max_test: 100}
      - {name: trec, type: clustering, path: clustering/trec-qc.jsonl, instruction: "...", max_items: 250}

Main score per type: retrieval ``ndcg@10``, sts ``spearman``, classification ``accuracy``, clustering
``v_measure``. A BM25 "model" runs retrieval tasks only (other tasks are reported as skipped). A retrieval task whose
qrels name documents absent from its corpus fails unless it sets ``allow_missing_docs: true`` (judgments dropped and
counted). :func:`load_suite` checks keys and paths first; its errors name the file, the task's line and the key.
Retrieval tasks keep their corpus on disk (:mod:`nvembed.eval.retrieval`: embeddings in a temporary store).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import yaml

from nvembed.errors import UserError

MAIN_METRIC = {"retrieval": "ndcg@10", "sts": "spearman", "classification": "accuracy", "clustering": "v_measure"}
_COMMON = {"name", "type", "instruction", "seed", "batch_size", "description"}
_KNOBS = {
    "retrieval": {"path", "split", "max_queries", "max_corpus", "max_judged_docs", "max_doc_chars", "max_query_chars",
                  "k", "allow_missing_docs"},
    "sts": {"path", "max_pairs"},
    "classification": {"train", "test", "max_train", "max_test", "max_chars"},
    "clustering": {"path", "max_items", "max_chars", "n_runs"},
}


class SuiteError(UserError, ValueError):
    """An eval suite YAML is invalid; the message names the file, the task's line and the key."""

    kind = "suite"


_REQUIRED = {"retrieval": ("path",), "sts": ("path",), "classification": ("train", "test"), "clustering": ("path",)}


def load_suite(path) -> Dict[str, Any]:
    """Read and validate a suite YAML; returns ``{"name", "tasks": [...], "root": folder}``. Errors name the file,
    the task's line, the key and (for data paths) the missing file."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: suite file not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise SuiteError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(spec, dict):
        raise SuiteError(f"{path}: expected a mapping with 'tasks', got {type(spec).__name__}")
    tasks = spec.get("tasks") or []
    if not isinstance(tasks, list) or not tasks:
        raise SuiteError(f"{path}: 'tasks' must be a non-empty list")
    lines = {}
    if isinstance(node, yaml.MappingNode):  # task i -> its line in the file, for the messages
        for k, v in node.value:
            if k.value == "tasks" and isinstance(v, yaml.SequenceNode):
                lines = {i: item.start_mark.line + 1 for i, item in enumerate(v.value)}
    root = path.parent
    seen = set()
    for i, t in enumerate(tasks):
        at = f"{path}:{lines[i]}" if i in lines else str(path)
        if not isinstance(t, dict):
            raise SuiteError(f"{at}: task #{i} must be a mapping, got {type(t).__name__}")
        typ = t.get("type")
        if typ not in _KNOBS:
            raise SuiteError(f"{at}: task #{i} field 'type' is {typ!r}; valid: {sorted(_KNOBS)}")
        label = f"task {t.get('name', '#' + str(i))!r}"
        unknown = set(t) - _COMMON - _KNOBS[typ]
        if unknown:
            raise SuiteError(f"{at}: {label}: unknown keys {sorted(unknown)}; valid: {sorted(_COMMON | _KNOBS[typ])}")
        for key in _REQUIRED[typ]:
            if not t.get(key):
                raise SuiteError(f"{at}: {label}: field '{key}' missing ({typ} tasks need {', '.join(_REQUIRED[typ])})")
            if not _p(root, t[key]).exists():
                raise SuiteError(f"{at}: {label}: field '{key}': {_p(root, t[key])} not found")
        t.setdefault("name", Path(str(t.get("path") or t.get("test"))).stem)
        if t["name"] in seen:
            raise SuiteError(f"{at}: duplicate task name {t['name']!r}")
        seen.add(t["name"])
    return {"name": spec.get("name", path.stem), "batch_size": spec.get("batch_size", 32), "seed": spec.get("seed", 0),
            "tasks": tasks, "root": root}


def _p(root: Path, rel) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def run_task(encoder, task: Dict[str, Any], root: Path, *, batch_size: int = 32, seed: int = 0,
             show_progress: bool = False, allow_missing_docs: bool = False, log=None) -> Dict[str, Any]:
    from nvembed.eval.classification import evaluate_classification_files
    from nvembed.eval.clustering import evaluate_clustering_file
    from nvembed.eval.encoders import BM25Retriever
    from nvembed.eval.retrieval import evaluate_retrieval
    from nvembed.eval.sts import evaluate_sts_file

    typ = task["type"]
    bs = task.get("batch_size", batch_size)
    sd = task.get("seed", seed)
    ins = task.get("instruction")
    if isinstance(encoder, BM25Retriever) and typ != "retrieval":
        return {"type": typ, "skipped": "bm25 is retrieval-only", "main_score": None}
    t0 = time.perf_counter()
    if typ == "retrieval":
        res = evaluate_retrieval(encoder, _p(root, task["path"]), instruction=ins, split=task.get("split", "test"),
                                 max_queries=task.get("max_queries"), max_corpus=task.get("max_corpus"),
                                 max_judged_docs=task.get("max_judged_docs"),
                                 max_doc_chars=task.get("max_doc_chars"), max_query_chars=task.get("max_query_chars"),
                                 seed=sd, batch_size=bs, k=task.get("k", 100), show_progress=show_progress,
                                 allow_missing_docs=bool(task.get("allow_missing_docs", allow_missing_docs)), log=log)
    elif typ == "sts":
        res = evaluate_sts_file(encoder, _p(root, task["path"]), instruction=ins, max_pairs=task.get("max_pairs"),
                                seed=sd, batch_size=bs, show_progress=show_progress)
    elif typ == "classification":
        res = evaluate_classification_files(encoder, _p(root, task["train"]), _p(root, task["test"]), instruction=ins,
                                            max_train=task.get("max_train"), max_test=task.get("max_test"),
                                            max_chars=task.get("max_chars"), seed=sd, batch_size=bs,
                                            show_progress=show_progress)
    else:
        res = evaluate_clustering_file(encoder, _p(root, task["path"]), instruction=ins,
                                       max_items=task.get("max_items"), max_chars=task.get("max_chars"),
                                       n_runs=task.get("n_runs", 1), seed=sd, batch_size=bs,
                                       show_progress=show_progress)
    res = {"type": typ, **res, "main_score": res[MAIN_METRIC[typ]], "seconds": round(time.perf_counter() - t0, 2)}
    return res


def run_suite(encoder, suite_path, *, tasks: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
              show_progress: bool = False, log=None, allow_missing_docs: bool = False) -> Dict[str, Any]:
    """Run every task (or the named ``tasks``) of a suite. Returns
    ``{"suite", "model", "tasks": {name: {type, metrics..., main_score, seconds}}, "average": {type: mean main
    score, "all": mean}, "seconds"}``."""
    suite = load_suite(suite_path)
    if tasks:
        unknown = sorted(set(tasks) - {t["name"] for t in suite["tasks"]})
        if unknown:
            raise SuiteError(f"{suite_path}: no task named {unknown}; tasks: {[t['name'] for t in suite['tasks']]}")
    t0 = time.perf_counter()
    out: Dict[str, Dict[str, Any]] = {}
    for task in suite["tasks"]:
        if tasks and task["name"] not in tasks:
            continue
        out[task["name"]] = run_task(encoder, task, suite["root"], batch_size=batch_size or suite["batch_size"],
                                     seed=suite["seed"], show_progress=show_progress,
                                     allow_missing_docs=allow_missing_docs, log=log)
        if log:
            log(f"[{suite['name']}] {task['name']}: {out[task['name']]}")
    avg: Dict[str, float] = {}
    for typ in MAIN_METRIC:
        vals = [r["main_score"] for r in out.values() if r["type"] == typ and r["main_score"] is not None]
        if vals:
            avg[typ] = float(np.mean(vals))
    if avg:
        avg["all"] = float(np.mean([r["main_score"] for r in out.values() if r["main_score"] is not None]))
    return {"suite": suite["name"], "model": getattr(encoder, "name", type(encoder).__name__), "tasks": out,
            "average": avg, "seconds": round(time.perf_counter() - t0, 2)}


class _CountingEncoder:
    """Random unit vectors; counts how many texts a suite encodes (for sizing demo suites)."""

    name = "count"

    def __init__(self):
        self.count = 0
        self.rng = np.random.default_rng(0)

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        self.count += len(texts)
        x = self.rng.standard_normal((len(texts), 8)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def count_suite_texts(suite_path) -> Dict[str, int]:
    """Number of texts each task of a suite encodes (runs the suite with a random encoder)."""
    suite = load_suite(suite_path)
    counts = {}
    for task in suite["tasks"]:
        enc = _CountingEncoder()
        run_task(enc, task, suite["root"], seed=suite["seed"])
        counts[task["name"]] = enc.count
    counts["total"] = sum(counts.values())
    return counts


def _cell(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_results_table(results: Mapping[str, Mapping[str, Any]], *, metrics: str = "main") -> str:
    """Markdown table: rows = model names (keys of ``results``), columns = tasks' main scores (x100) then the
    average; ``metrics="all"`` gives one column per task metric instead."""
    tasks: List[str] = []
    for r in results.values():
        for t in r["tasks"]:
            if t not in tasks:
                tasks.append(t)
    cols: List[tuple] = []
    for t in tasks:
        rec = next(r["tasks"][t] for r in results.values() if t in r["tasks"])
        if metrics == "all":
            keys = [k for k, v in rec.items() if isinstance(v, float) and k not in ("main_score", "seconds")]
            cols += [(t, k) for k in keys]
        else:
            cols.append((t, "main_score"))
    head = ["model"] + [t if k == "main_score" else f"{t}/{k}" for t, k in cols] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for model, r in results.items():
        cells = [model] + [_cell(r["tasks"].get(t, {}).get(k)) for t, k in cols]
        cells.append(_cell(r.get("average", {}).get("all")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_bar_chart(results: Mapping[str, Mapping[str, Any]], path, *, title: Optional[str] = None) -> Path:
    """Grouped bar chart (PNG, matplotlib Agg) of main scores: one group per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: List[str] = []
    for r in results.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    models = list(results)
    x = np.arange(len(tasks))
    w = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) + 2), 4))
    for i, m in enumerate(models):
        vals = [results[m]["tasks"].get(t, {}).get("main_score") for t in tasks]
        ax.bar(x + i * w - 0.4 + w / 2, [100 * v if v is not None else 0 for v in vals], w, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("main score x100")
    ax.set_title(title or "evaluation suite")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
