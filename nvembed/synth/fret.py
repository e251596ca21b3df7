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
candidates}``), ``stats.json``, ``specs/``, ``corpus_emb_<key>/`` (the collection's embedding store). Append-only
and keyed by seed passage id: a restart resumes.

The collection stays on disk (:mod:`.passages`): seeds are sampled by row, the embeddings are written to a
memory-mapped store as they are encoded (:mod:`nvembed.mining.store`, resumable), the top-N search streams it chunk
by chunk and the candidates' texts are read by row. What grows with the collection is 24 bytes a passage.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .llm import BaseLLM
from .loop import Outcome, SynthRun, generate_work
from .output import write_specs
from .parse import parse_task_query
from .passages import PassagePool, read_passages
from .prompts import ql_prompt, query_prompt, rc_prompt
from .resume import JsonlLog, stable_id

__all__ = ["FRetConfig", "run_fret", "read_passages", "fuse", "ranks", "PassagePool"]


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
    encode_chunk_size: int = 4096
    """Passages encoded and written to the embedding store at a time (a killed encode resumes at the first chunk
    not written)."""
    query_encoding: str = "instruction"
    """``instruction``: encode(query, instruction=task); ``concat``: encode(task + " " + query) (for embedders
    trained without instructions, e.g. all-MiniLM)."""
    stages: Sequence[str] = ("stage1", "stage2")
    spec_mode: str = "auto"
    name: str = "fret"
    keep_candidates: bool = True


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


def corpus_store(encoder, pool: PassagePool, out: Path, cfg: FRetConfig, log):
    """The collection's embeddings in an on-disk store under ``out`` (named by the embedder and every text),
    encoded chunk by chunk on first use and resumed after a kill."""
    from nvembed.mining.store import EmbeddingStore, encode_to_store

    name = getattr(encoder, "name", type(encoder).__name__)
    folder = out / f"corpus_emb_{stable_id('corpus', name, len(pool), pool.fingerprint)}"
    if (folder / "meta.json").is_file() and EmbeddingStore(folder).complete():
        return EmbeddingStore(folder)
    log(f"[fret] encoding {len(pool)} passages with {name}")
    return encode_to_store(encoder, pool.texts, folder, chunk_size=cfg.encode_chunk_size,
                           batch_size=cfg.encode_batch_size, meta={"passages": pool.source})


def _encode_queries(encoder, chunk: List[Dict[str, Any]], queries: Dict[str, Dict[str, Any]], dim: int,
                    cfg: FRetConfig) -> np.ndarray:
    """Query embeddings, grouped by task: the task is the instruction of the query encoding."""
    qemb = np.zeros((len(chunk), dim), dtype=np.float32)
    by_task: Dict[str, List[int]] = {}
    for j, it in enumerate(chunk):
        by_task.setdefault(queries[it["id"]]["task"], []).append(j)
    for task, js in by_task.items():
        qs_text = [queries[chunk[j]["id"]]["query"] for j in js]
        if cfg.query_encoding == "concat":
            qemb[js] = encoder.encode([f"{task} {q}" for q in qs_text], instruction=None,
                                      batch_size=cfg.encode_batch_size)
        else:
            qemb[js] = encoder.encode(qs_text, instruction=task, batch_size=cfg.encode_batch_size)
    return qemb


def _score_work(llm: BaseLLM, encoder, pool: PassagePool, store, queries: Dict[str, Dict[str, Any]],
                cfg: FRetConfig, cut: Callable[[str], str]) -> Callable[[List[Dict[str, Any]]], List[Outcome]]:
    """``work`` of steps 2-4 for a chunk of seeds: retrieve, score with QL/RC, fuse, relabel."""
    from nvembed.mining.topk import chunked_topk

    k = min(cfg.top_n, len(pool))

    def work(chunk: List[Dict[str, Any]]) -> List[Outcome]:
        top = chunked_topk(_encode_queries(encoder, chunk, queries, store.dim, cfg), store, k)[1]  # streams the store
        cands: List[List[int]] = []
        for j, it in enumerate(chunk):
            c = [int(x) for x in top[j]]
            if cfg.include_seed and it["row"] not in c:
                c[-1] = it["row"]
            cands.append(c)
        got = pool.fetch(c for cs in cands for c in cs)  # the candidates' (id, text), read by row
        flat = [(it, c) for it, cs in zip(chunk, cands) for c in cs]
        ql = rc = None
        if "ql" in cfg.scorers:
            ql = llm.loglikelihood([ql_prompt(cut(got[c][1])) for _, c in flat],
                                   [" " + queries[it["id"]]["query"] for it, _ in flat])
        if "rc" in cfg.scorers:
            rc = llm.label_logprob([rc_prompt(queries[it["id"]]["task"], queries[it["id"]]["query"], cut(got[c][1]))
                                    for it, c in flat], cfg.rc_label)
        outcomes, pos = [], 0
        for it, cs in zip(chunk, cands):
            n = len(cs)
            qs = ql[pos:pos + n] if ql is not None else None
            rs = rc[pos:pos + n] if rc is not None else None
            pos += n
            row = _relabel(it, cs, got, queries[it["id"]], qs, rs, cfg)
            outcomes.append(Outcome("scored", (row,), {"relabeled": int(row["relabeled"])}))
        return outcomes

    return work


def _relabel(it: Dict[str, Any], cs: List[int], got: Dict[int, Tuple[str, str]], q: Dict[str, Any],
             qs: Optional[Sequence[float]], rs: Optional[Sequence[float]], cfg: FRetConfig) -> Dict[str, Any]:
    """The example row of one seed: positive = fused rank 1, hard negative = fused rank ``negative_rank``."""
    sid, seed_row = it["id"], it["row"]
    fused, order = fuse(qs, rs)
    p_idx = cs[order[0]]
    neg_r = min(cfg.negative_rank, len(cs))
    n_idx = cs[order[neg_r - 1]] if neg_r >= 2 else None
    seed_pos = cs.index(seed_row) if seed_row in cs else None
    row: Dict[str, Any] = {
        "id": sid, "query": q["query"], "positive": got[p_idx][1],
        "negatives": [got[n_idx][1]] if n_idx is not None and n_idx != p_idx else [],
        "instruction": q["task"], "symmetric": False, "seed_id": sid, "positive_id": got[p_idx][0],
        "negative_id": got[n_idx][0] if n_idx is not None else None, "relabeled": got[p_idx][0] != sid,
        "seed_fused_rank": (order.index(seed_pos) + 1) if seed_pos is not None else None,
    }
    if cfg.keep_candidates:
        row["candidates"] = [
            {"id": got[cs[o]][0], "retrieval_rank": o + 1, "fused": round(float(fused[o]), 6),
             **({"ql": round(float(qs[o]), 4)} if qs is not None else {}),
             **({"rc": round(float(rs[o]), 4)} if rs is not None else {})}
            for o in order]
    return row


def _parse_query(it: Dict[str, Any], text: str) -> Outcome:
    try:
        return Outcome("ok", ({"id": it["id"], "status": "ok", **parse_task_query(text)},))
    except ValueError as e:
        return Outcome(str(e), ({"id": it["id"], "status": str(e), "raw": text[:2000]},))


def run_fret(llm: BaseLLM, encoder, passages: PassagePool | Sequence[Tuple[str, str]], out_dir: str | Path,
             cfg: FRetConfig, *, log: Callable[[str], None] = print, show_progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) FRet over ``passages`` (:func:`read_passages`, or [(id, text)]); returns stats (also in
    ``out_dir/stats.json``)."""
    if cfg.query_encoding not in ("instruction", "concat"):
        raise ValueError(f"query_encoding is {cfg.query_encoding!r}; valid: instruction, concat")
    if not set(cfg.scorers) <= {"ql", "rc"} or not cfg.scorers:
        raise ValueError(f"scorers must be a non-empty subset of ql, rc; got {list(cfg.scorers)}")
    pool = passages if isinstance(passages, PassagePool) else PassagePool.from_pairs(passages)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows_of_seeds = range(len(pool))
    if cfg.num_seeds is not None and cfg.num_seeds < len(pool):
        rows_of_seeds = sorted(random.Random(cfg.seed).sample(rows_of_seeds, cfg.num_seeds))
    seeds = [{"id": pool.ids[r], "row": r} for r in rows_of_seeds]  # per seed: its id and row, no text
    seed_set = {it["id"] for it in seeds}
    run = SynthRun(llm, out, limit=cfg.limit, show_progress=show_progress)

    def cut(t: str) -> str:
        return t if len(t) <= cfg.max_passage_chars else t[:cfg.max_passage_chars] + " ..."

    # -- 1. query generation ----------------------------------------------------------------------------------
    with JsonlLog(out / "queries.jsonl") as q_log:
        run.phase("fret queries", seeds, [q_log],
                  generate_work(llm, lambda it: query_prompt(cut(pool[it["row"]][1])), _parse_query,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed),
                  chunk_size=cfg.chunk_size, prefix="query_")

    # -- 2-4. retrieve, score, fuse, relabel --------------------------------------------------------------------
    with JsonlLog(out / "examples.jsonl") as ex_log:
        ok, queries = set(), {}  # the (task, query) of the seeds still to score, not of the others
        for r in q_log.rows:
            if r.get("status") == "ok":
                ok.add(r["id"])
                if r["id"] not in ex_log and r["id"] in seed_set:
                    queries[r["id"]] = {"task": r["task"], "query": r["query"]}
        todo = [it for it in seeds if it["id"] in ok]
        if run.left > 0 and any(it["id"] in queries for it in todo):
            store = corpus_store(encoder, pool, out, cfg, log)
            run.phase("fret scoring", todo, [ex_log], _score_work(llm, encoder, pool, store, queries, cfg, cut),
                      chunk_size=cfg.chunk_size)

    # -- stats + specs (the logs streamed from disk) ------------------------------------------------------------
    q_status = Counter(r["status"] for r in q_log.rows if r["id"] in seed_set)
    n = Counter()
    for r in ex_log.rows:
        if r["id"] in seed_set:
            n.update(rows=1, relabeled=int(r["relabeled"]), with_negative=int(bool(r["negatives"])))
    spec_paths = write_specs(out, (r for r in ex_log.rows if r["id"] in seed_set), name=cfg.name, stages=cfg.stages,
                             mode=cfg.spec_mode,
                             description=f"Gecko FRet data from {llm.name} (top-{cfg.top_n}, negative rank "
                                         f"{cfg.negative_rank}, scorers {'+'.join(cfg.scorers)})") if n["rows"] else []
    stats = {
        "model": llm.name, "embedder": getattr(encoder, "name", type(encoder).__name__),
        "passages": len(pool), "seeds": len(seeds),
        "queries": {"done": sum(q_status.values()), **dict(q_status)},
        "rows": n["rows"],
        "relabeled": n["relabeled"],
        "relabeled_fraction": round(n["relabeled"] / n["rows"], 4) if n["rows"] else None,
        "with_negative": n["with_negative"],
        "this_run": dict(run.counts), "this_run_seconds": round(time.time() - t0, 2),
        "complete": sum(q_status.values()) == len(seeds) and n["rows"] == q_status.get("ok", 0),
        "llm": dict(getattr(llm, "stats", {})),
        "specs": [str(p) for p in spec_paths],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    log(f"[fret] {stats['rows']} rows ({stats['relabeled']} relabeled); queries {stats['queries']}; "
        f"this run {dict(run.counts)} in {stats['this_run_seconds']}s")
    return stats
