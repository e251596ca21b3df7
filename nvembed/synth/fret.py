"""Gecko FRet (Lee et al. 2024, arXiv 2403.20327 §3.2): two-step LLM distillation.

1. *Query generation*: per seed passage, the LLM writes a task description and a query (JSON ``{task, query}``).
2. *Retrieve*: an initial embedder (``encode(texts, instruction=...)``, L2-normalised) retrieves the top-N
   neighbours of ``task + query`` (the task is the query instruction) from the passage collection.
3. *Rerank* with the same LLM: query likelihood ``QL = log p(query | passage, P_QL)`` and relevance classification
   ``RC = log p("yes" | query, passage, P_RC)``; fused by rank, ``R = 1/r_QL + 1/r_RC`` (no k constant).
4. *Relabel*: the new positive is the top passage by R (it may differ from the seed); the hard negative is the
   passage at fused rank ``negative_rank`` (default 20, clipped to the number of candidates).

Files in ``out_dir``: ``queries.jsonl`` (one record per seed: status, task, query), ``examples.jsonl`` (one row per
scored seed: ``{id, query, positive, negatives, instruction, seed_id, positive_id, negative_id, relabeled,
candidates}``), ``stats.json``, ``specs/``. Append-only and keyed by seed passage id: a restart resumes.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .e5 import extract_json
from .llm import BaseLLM, check_reachable
from .output import write_specs
from .resume import JsonlLog, progress, read_jsonl, stable_id

QG_PROMPT = (
    "You read a web passage and write a task description and a search query for which the passage is useful.\n"
    "The task is one sentence that tells what kind of passage should be retrieved for the query. Examples of tasks:\n"
    "- Given a query, find a passage that has the answer to the query\n"
    "- Given a query, find a passage that allows you to check whether the query is true or not\n\n"
    "Example 1\n"
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the world.\n"
    'Output: {{"task": "Given a query, find a passage that has the answer to the query", '
    '"query": "which river carries the most water"}}\n\n'
    "Example 2\n"
    "Passage: Vitamin C was first isolated in 1928 by the Hungarian biochemist Albert Szent-Gyorgyi.\n"
    'Output: {{"task": "Given a query, find a passage that allows you to check whether the query is true or not", '
    '"query": "vitamin C was discovered by a Hungarian scientist"}}\n\n'
    "Now the passage to use:\n"
    "Passage: {passage}\n"
    'Write the output as a JSON object with keys "task" and "query" only; do not copy the passage. Output:')

QL_PROMPT = (
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the world.\n"
    "Query: which river carries the most water\n\n"
    "Passage: {passage}\n"
    "Query:")

RC_PROMPT = (
    "Decide whether the passage is relevant to the query for the task. Answer yes or no.\n\n"
    "Task: Given a query, find a passage that has the answer to the query\n"
    "Query: which river carries the most water\n"
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the world.\n"
    "Relevant: yes\n\n"
    "Task: Given a query, find a passage that has the answer to the query\n"
    "Query: which river carries the most water\n"
    "Passage: Vitamin C was first isolated in 1928 by the Hungarian biochemist Albert Szent-Gyorgyi.\n"
    "Relevant: no\n\n"
    "Task: {task}\n"
    "Query: {query}\n"
    "Passage: {passage}\n"
    "Relevant:")


@dataclass
class FRetConfig:
    top_n: int = 20
    negative_rank: int = 20
    """1-based fused rank of the hard negative (Gecko's best: 20); clipped to the candidates; 1 or 0 = none."""
    num_seeds: Optional[int] = None
    """Seed passages sampled (seeded) from the collection; None = all."""
    include_seed: bool = True
    """Score the seed passage even when the embedder did not retrieve it (it replaces the N-th neighbour)."""
    scorers: Sequence[str] = ("ql", "rc")
    rc_label: str = "yes"
    seed: int = 0
    temperature: float = 0.7
    max_new_tokens: int = 256
    max_passage_chars: int = 2000
    """Passages are cut to this many characters inside prompts."""
    chunk_size: int = 16
    limit: Optional[int] = None
    """Stop after this many seeds processed in this run (query generation + scoring each count once)."""
    encode_batch_size: int = 64
    query_encoding: str = "instruction"
    """``instruction``: encode(query, instruction=task); ``concat``: encode(task + " " + query) (for embedders
    trained without instructions, e.g. all-MiniLM)."""
    stages: Sequence[str] = ("stage1", "stage2")
    spec_mode: str = "auto"
    name: str = "fret"
    keep_candidates: bool = True


def read_passages(path: str | Path) -> List[Tuple[str, str]]:
    """(id, text) pairs from JSONL (``id``/``_id``/``doc_id``/``corpus_id`` + ``text``/``passage``/``contents``,
    ``title`` prepended) or TXT (one passage per line; id = content hash). Exact duplicate texts are dropped."""
    p = Path(path)
    out: "OrderedDict[str, Tuple[str, str]]" = OrderedDict()
    if p.suffix.lower() in (".jsonl", ".json"):
        for i, r in enumerate(read_jsonl(p)):
            text = next((r[k] for k in ("text", "passage", "contents", "corpus_text") if r.get(k)), None)
            if not isinstance(text, str) or not text.strip():
                continue
            if r.get("title"):
                text = f"{r['title']}\n{text}"
            pid = next((str(r[k]) for k in ("id", "_id", "doc_id", "corpus_id") if r.get(k) is not None), None)
            text = text.strip()
            out.setdefault(text, (pid or stable_id(text), text))
    else:
        for line in p.read_text(encoding="utf-8").splitlines():
            t = line.strip()
            if t:
                out.setdefault(t, (stable_id(t), t))
    rows = list(out.values())
    if len({pid for pid, _ in rows}) != len(rows):
        raise ValueError(f"{p}: passage ids are not unique")
    return rows


def parse_task_query(text: str) -> Dict[str, str]:
    try:
        obj = extract_json(text, dict)
    except ValueError:
        raise ValueError("invalid_json") from None
    task, query = obj.get("task"), obj.get("query")
    if not (isinstance(task, str) and task.strip() and isinstance(query, str) and query.strip()):
        raise ValueError("missing_keys")
    return {"task": " ".join(task.split()), "query": " ".join(query.split())}


def ranks(scores: Sequence[float]) -> np.ndarray:
    """1-based ranks by descending score; ties keep the retrieval order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    r = np.empty(len(scores), dtype=np.int64)
    r[order] = np.arange(1, len(scores) + 1)
    return r


def fuse(ql: Optional[Sequence[float]], rc: Optional[Sequence[float]]) -> Tuple[np.ndarray, List[int]]:
    """Reciprocal-rank fusion without k: ``R = 1/r_QL + 1/r_RC`` (only the scorers given). Returns (R, order)."""
    parts = [ranks(s) for s in (ql, rc) if s is not None]
    if not parts:
        raise ValueError("need at least one scorer")
    fused = sum(1.0 / r for r in parts)
    order = sorted(range(len(fused)), key=lambda i: (-fused[i], i))
    return fused, order


def _topk(queries: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    try:
        from nvembed.mining.topk import chunked_topk

        return chunked_topk(queries, docs, k)[1]
    except ImportError:  # pragma: no cover - mining module missing
        s = queries @ docs.T
        return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _encode_corpus(encoder, texts: List[str], out: Path, batch_size: int, log) -> np.ndarray:
    name = getattr(encoder, "name", type(encoder).__name__)
    key = stable_id("corpus", name, len(texts), stable_id(*texts[:1000]), stable_id(*texts[-1000:]))
    cache = out / f"corpus_emb_{key}.npy"
    if cache.exists():
        return np.load(cache)
    log(f"[fret] encoding {len(texts)} passages with {name}")
    emb = np.asarray(encoder.encode(texts, instruction=None, batch_size=batch_size), dtype=np.float32)
    np.save(cache, emb)
    return emb


def run_fret(llm: BaseLLM, encoder, passages: Sequence[Tuple[str, str]], out_dir: str | Path, cfg: FRetConfig, *,
             log: Callable[[str], None] = print, show_progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) FRet over ``passages`` [(id, text)]; returns stats (also in ``out_dir/stats.json``)."""
    if cfg.query_encoding not in ("instruction", "concat"):
        raise ValueError(f"query_encoding is {cfg.query_encoding!r}; valid: instruction, concat")
    if not set(cfg.scorers) <= {"ql", "rc"} or not cfg.scorers:
        raise ValueError(f"scorers must be a non-empty subset of ql, rc; got {list(cfg.scorers)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ids = [pid for pid, _ in passages]
    texts = [t for _, t in passages]
    index = {pid: i for i, pid in enumerate(ids)}
    seeds = list(range(len(passages)))
    if cfg.num_seeds is not None and cfg.num_seeds < len(seeds):
        seeds = sorted(random.Random(cfg.seed).sample(seeds, cfg.num_seeds))
    seed_ids = [ids[i] for i in seeds]
    budget = [cfg.limit if cfg.limit is not None else math.inf]
    run_stats: Counter = Counter()

    def cut(t: str) -> str:
        return t if len(t) <= cfg.max_passage_chars else t[:cfg.max_passage_chars] + " ..."

    # -- 1. query generation ----------------------------------------------------------------------------------
    q_log = JsonlLog(out / "queries.jsonl")
    pending = [sid for sid in seed_ids if sid not in q_log]
    if pending and budget[0] > 0:
        bar = progress(len(seed_ids), "fret queries", len(seed_ids) - len(pending), disable=not show_progress)
        pending = pending[:int(min(len(pending), budget[0]))]
        for i in range(0, len(pending), cfg.chunk_size):
            chunk = pending[i:i + cfg.chunk_size]
            prompts = [QG_PROMPT.format(passage=cut(texts[index[sid]])) for sid in chunk]
            outs = llm.generate(prompts, cfg.max_new_tokens, cfg.temperature,
                                seed=int(stable_id(cfg.seed, chunk[0])[:8], 16))
            rows = []
            for sid, text in zip(chunk, outs):
                budget[0] -= 1
                if not text:
                    run_stats["query_failed_request"] += 1
                    continue
                try:
                    tq = parse_task_query(text)
                    rows.append({"id": sid, "status": "ok", **tq})
                    run_stats["query_ok"] += 1
                except ValueError as e:
                    rows.append({"id": sid, "status": str(e), "raw": text[:2000]})
                    run_stats[f"query_{e}"] += 1
            q_log.append(rows)
            check_reachable(llm, out)  # endpoint down: stop now, what succeeded is saved
            bar.update(len(chunk))
        bar.close()
    q_log.close()
    queries = {r["id"]: r for r in q_log.rows if r.get("status") == "ok"}

    # -- 2-4. retrieve, score, fuse, relabel --------------------------------------------------------------------
    ex_log = JsonlLog(out / "examples.jsonl")
    todo = [sid for sid in seed_ids if sid in queries and sid not in ex_log]
    budget_left = budget[0]
    if todo and budget_left > 0:
        todo = todo[:int(min(len(todo), budget_left))]
        corpus = _encode_corpus(encoder, texts, out, cfg.encode_batch_size, log)
        k = min(cfg.top_n, len(texts))
        bar = progress(len(todo), "fret scoring", 0, disable=not show_progress)
        for i in range(0, len(todo), cfg.chunk_size):
            chunk = todo[i:i + cfg.chunk_size]
            # queries grouped by task: the task is the instruction of the query encoding
            qemb = np.zeros((len(chunk), corpus.shape[1]), dtype=np.float32)
            by_task: Dict[str, List[int]] = {}
            for j, sid in enumerate(chunk):
                by_task.setdefault(queries[sid]["task"], []).append(j)
            for task, js in by_task.items():
                qs_text = [queries[chunk[j]]["query"] for j in js]
                if cfg.query_encoding == "concat":
                    qemb[js] = encoder.encode([f"{task} {q}" for q in qs_text], instruction=None,
                                              batch_size=cfg.encode_batch_size)
                else:
                    qemb[js] = encoder.encode(qs_text, instruction=task, batch_size=cfg.encode_batch_size)
            top = _topk(qemb, corpus, k)
            cands: List[List[int]] = []
            for j, sid in enumerate(chunk):
                c = [int(x) for x in top[j]]
                if cfg.include_seed and index[sid] not in c:
                    c[-1] = index[sid]
                cands.append(c)
            flat = [(j, c) for j, cs in enumerate(cands) for c in cs]
            ql = rc = None
            if "ql" in cfg.scorers:
                ql = llm.loglikelihood([QL_PROMPT.format(passage=cut(texts[c])) for _, c in flat],
                                       [" " + queries[chunk[j]]["query"] for j, _ in flat])
            if "rc" in cfg.scorers:
                rc = llm.label_logprob([RC_PROMPT.format(task=queries[chunk[j]]["task"],
                                                         query=queries[chunk[j]]["query"], passage=cut(texts[c]))
                                        for j, c in flat], cfg.rc_label)
            rows, pos = [], 0
            for j, sid in enumerate(chunk):
                n = len(cands[j])
                qs = ql[pos:pos + n] if ql is not None else None
                rs = rc[pos:pos + n] if rc is not None else None
                pos += n
                fused, order = fuse(qs, rs)
                p_idx = cands[j][order[0]]
                neg_r = min(cfg.negative_rank, n)
                n_idx = cands[j][order[neg_r - 1]] if neg_r >= 2 else None
                seed_pos = cands[j].index(index[sid]) if index[sid] in cands[j] else None
                q = queries[sid]
                row: Dict[str, Any] = {
                    "id": sid, "query": q["query"], "positive": texts[p_idx],
                    "negatives": [texts[n_idx]] if n_idx is not None and n_idx != p_idx else [],
                    "instruction": q["task"], "symmetric": False, "seed_id": sid, "positive_id": ids[p_idx],
                    "negative_id": ids[n_idx] if n_idx is not None else None, "relabeled": ids[p_idx] != sid,
                    "seed_fused_rank": (order.index(seed_pos) + 1) if seed_pos is not None else None,
                }
                if cfg.keep_candidates:
                    row["candidates"] = [
                        {"id": ids[cands[j][o]], "retrieval_rank": o + 1, "fused": round(float(fused[o]), 6),
                         **({"ql": round(float(qs[o]), 4)} if qs is not None else {}),
                         **({"rc": round(float(rs[o]), 4)} if rs is not None else {})}
                        for o in order]
                rows.append(row)
                run_stats["scored"] += 1
                run_stats["relabeled"] += int(row["relabeled"])
            ex_log.append(rows)
            bar.update(len(chunk))
        bar.close()
    ex_log.close()

    # -- stats + specs ------------------------------------------------------------------------------------------
    seed_set = set(seed_ids)
    q_status = Counter(r["status"] for r in q_log.rows if r["id"] in seed_set)
    rows = [r for r in ex_log.rows if r["id"] in seed_set]
    spec_paths = write_specs(out, rows, name=cfg.name, stages=cfg.stages, mode=cfg.spec_mode,
                             description=f"Gecko FRet data from {llm.name} (top-{cfg.top_n}, negative rank "
                                         f"{cfg.negative_rank}, scorers {'+'.join(cfg.scorers)})") if rows else []
    stats = {
        "model": llm.name, "embedder": getattr(encoder, "name", type(encoder).__name__),
        "passages": len(passages), "seeds": len(seed_ids),
        "queries": {"done": sum(q_status.values()), **dict(q_status)},
        "rows": len(rows),
        "relabeled": sum(int(r["relabeled"]) for r in rows),
        "relabeled_fraction": round(sum(int(r["relabeled"]) for r in rows) / len(rows), 4) if rows else None,
        "with_negative": sum(1 for r in rows if r["negatives"]),
        "this_run": dict(run_stats), "this_run_seconds": round(time.time() - t0, 2),
        "complete": sum(q_status.values()) == len(seed_ids) and len(rows) == q_status.get("ok", 0),
        "llm": dict(getattr(llm, "stats", {})),
        "specs": [str(p) for p in spec_paths],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    log(f"[fret] {stats['rows']} rows ({stats['relabeled']} relabeled); queries {stats['queries']}; "
        f"this run {dict(run_stats)} in {stats['this_run_seconds']}s")
    return stats
