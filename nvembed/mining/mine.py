"""Hard-negative mining with a teacher encoder and positive-aware rules.

Pipeline: deduplicate the corpus by text (positives are added to it) -> encode corpus and queries into embedding
stores on disk (:mod:`~nvembed.mining.store`: written chunk by chunk, resumable, sharded over the ranks of an
accelerate launch) -> rank 0 searches the corpus store per block of queries (:mod:`~nvembed.mining.index`: streamed
exact top-k, or a FAISS IVF / IVF-PQ / HNSW index filled chunk by chunk, with its recall@k against exact search
measured on a sample of queries) -> :func:`~nvembed.mining.rules.select_negatives` per query.

Enough candidates are retrieved for the rank window to survive the removal of positives:
``k = range_max + max #positives per query + 1`` (the FAISS path once returned too few candidates with several
positives, sentence-transformers PR #3872).

Output records (JSONL, the retrieval data spec): ``{"query", "positives", "negatives", "negative_scores",
"positive_scores", ...pass-through fields}``; :func:`write_mined` writes them with their data spec (built by
:func:`mined_spec`, written by :func:`nvembed.data.spec.write_spec`: the trainer loads it as is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from nvembed.data.spec import DataSpec, FieldsSpec, SourceSpec, SpecError, parse_spec, write_spec
from nvembed.mining.cache import store_folder
from nvembed.mining.index import SearchConfig, build_index, estimate_recall, search
from nvembed.mining.rules import MiningRule, select_negatives
from nvembed.mining.store import StoreError, encode_to_store


class Ranks:
    """This process's place in an accelerate/torchrun launch (rank 0 of 1 when not launched)."""

    def __init__(self):
        self.rank, self.world, self._state, self.device = 0, 1, None, None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch
            from accelerate import PartialState

            # cpu=True when there is no GPU: accelerate then joins the launch with gloo instead of running alone
            self._state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = self._state.process_index, self._state.num_processes
            self.device = self._state.device
            if self.world != world:
                raise RuntimeError(f"WORLD_SIZE={world} but accelerate joined {self.world} process(es)")

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


def mine_hard_negatives(teacher, queries: Sequence[str], positives: Sequence[Sequence[str]],
                        corpus: Optional[Sequence[str]] = None, *, rule: Optional[MiningRule] = None,
                        instruction: Optional[str] = None, batch_size: int = 32, cache_dir: Optional[str] = None,
                        search_config: Optional[SearchConfig] = None, use_faiss: bool = False,
                        store_dtype: str = "float32", encode_chunk_size: int = 4096, query_block_size: int = 4096,
                        query_chunk_size: Optional[int] = None, doc_chunk_size: Optional[int] = None,
                        corpus_ids: Optional[Sequence[str]] = None, exclude_query_text: bool = True,
                        show_progress: bool = True, stats: Optional[Dict[str, Any]] = None,
                        ranks: Optional[Ranks] = None) -> List[Dict[str, Any]]:
    """Mine hard negatives for each ``queries[i]`` with positives ``positives[i]`` from ``corpus``.

    Args:
        teacher: a TextEncoder (queries encoded with ``instruction``, documents without).
        corpus: candidate documents; None = the pool of all positives. Positives are always added to it.
        rule: :class:`MiningRule` (default TopK-PercPos 0.95, ranks [0, 50), 4 negatives, top sampling).
        cache_dir: folder of the resumable embedding stores (keyed by teacher name + texts); None = a temporary
            folder removed at the end (one process only: several ranks share the stores through ``cache_dir``).
        search_config: how to search (:class:`SearchConfig`: exact streamed by default, or a FAISS index).
        use_faiss: shorthand for ``SearchConfig(index="flat")`` (FAISS IndexFlatIP).
        store_dtype: ``float32`` or ``float16`` on disk (half the disk and I/O; scores computed in float32).
        query_block_size: queries searched at once (memory ``block * k``, never ``nq * nd``).
        corpus_ids: ids of ``corpus`` rows, written beside the corpus embeddings (``ids.txt``).
        exclude_query_text: never select a document whose text equals the query (symmetric/STS-style pools).
        stats: if a dict is given, it is filled with counts (queries, corpus size, short queries, recall, seconds).
        ranks: the launch (default: read from the environment); ranks other than 0 encode their share and return [].
    """
    rule = rule or MiningRule()
    cfg = dataclasses.replace(search_config or SearchConfig(index="flat" if use_faiss else "exact"))
    if query_chunk_size:
        cfg.query_chunk_size = query_chunk_size
    if doc_chunk_size:
        cfg.doc_chunk_size = doc_chunk_size
    ranks = ranks or Ranks()
    if len(queries) != len(positives):
        raise ValueError("queries and positives must have the same length")
    t0 = time.perf_counter()
    texts: List[str] = []
    ids: List[str] = []
    index: Dict[str, int] = {}

    def add(t: str, i: str) -> int:
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
            ids.append(i)
        return index[t]

    for n, t in enumerate(corpus or ()):
        add(t, str(corpus_ids[n]) if corpus_ids is not None else str(n))
    pos_ids = [[add(p, f"q{qi}-pos{j}") for j, p in enumerate(dict.fromkeys(ps))] for qi, ps in enumerate(positives)]
    if any(not p for p in pos_ids) and rule.rule in ("topk_percpos", "topk_marginpos"):
        raise ValueError(f"{rule.rule} needs at least one positive per query")
    if not queries:
        return []
    if not texts:
        raise ValueError("no documents to mine from: give a corpus or positives")
    if cache_dir is None and ranks.world > 1:
        raise StoreError("several processes share the embeddings through a folder: pass a cache folder (--cache)")
    with tempfile.TemporaryDirectory(prefix="nvembed-mine-") as tmp:
        root = cache_dir if cache_dir is not None else tmp
        common = dict(dtype=store_dtype, chunk_size=encode_chunk_size, batch_size=batch_size, rank=ranks.rank,
                      world=ranks.world, barrier=ranks.barrier, show_progress=show_progress)
        d_store = encode_to_store(teacher, texts, store_folder(root, teacher, texts, None, store_dtype),
                                  ids=ids, desc="encode corpus", **common)
        q_store = encode_to_store(teacher, list(queries), store_folder(root, teacher, queries, instruction,
                                                                        store_dtype),
                                  instruction=instruction, desc="encode queries", **common)
        if ranks.rank != 0:
            return []
        t_search = time.perf_counter()
        records, run_stats = _search_and_select(queries, texts, index, pos_ids, d_store, q_store, rule, cfg,
                                                query_block_size, exclude_query_text, show_progress)
    if stats is not None:
        stats.update({"num_queries": len(queries), "corpus_size": len(texts), **run_stats,
                      "search_seconds": round(time.perf_counter() - t_search, 2),
                      "seconds": round(time.perf_counter() - t0, 2)})
    return records


def _search_and_select(queries, texts, index, pos_ids, d_store, q_store, rule, cfg, query_block_size,
                       exclude_query_text, show_progress):
    max_pos = max((len(p) for p in pos_ids), default=0)
    extra = 1 if exclude_query_text else 0
    k = len(texts) if rule.range_max is None else min(len(texts), rule.range_max + max_pos + extra)
    ann = build_index(d_store, cfg)
    run_stats: Dict[str, Any] = {"k_retrieved": k}
    if cfg.approximate:
        run_stats["recall"] = estimate_recall(ann, q_store, d_store, k, cfg)
    records: List[Dict[str, Any]] = []
    n_short = 0
    blocks = range(0, len(queries), query_block_size)
    for b in tqdm(blocks, desc="mine", disable=not show_progress, total=len(blocks)):
        qb = q_store[b:b + query_block_size]
        scores, idx = search(qb, d_store, k, cfg, ann)
        flat_pos = [p for pids in pos_ids[b:b + len(qb)] for p in pids]
        pos_rows = d_store.take(flat_pos)
        at = 0
        for j in range(len(qb)):
            qi = b + j
            pids = pos_ids[qi]
            pscores = [float(s) for s in pos_rows[at:at + len(pids)] @ qb[j]]
            at += len(pids)
            excl = [index[queries[qi]]] if exclude_query_text and queries[qi] in index else []
            found = idx[j] >= 0  # an approximate index may return fewer than k
            neg_ids, neg_scores = select_negatives(idx[j][found], scores[j][found], pids, pscores, rule,
                                                   query_index=qi, excluded_ids=excl)
            n_short += len(neg_ids) < rule.num_negatives
            records.append({"query": queries[qi], "positives": [texts[p] for p in pids],
                            "negatives": [texts[n] for n in neg_ids],
                            "negative_scores": [round(s, 6) for s in neg_scores],
                            "positive_scores": [round(s, 6) for s in pscores]})
    run_stats["queries_with_fewer_negatives"] = n_short
    return records, run_stats


# ----------------------------------------------------------------------------------------------- file helpers

_QUERY_KEYS = ("query", "anchor", "question", "q")
_POS_KEYS = ("positives", "positive", "pos", "document", "answer")


def _jsonl(path):
    """``(line number, row)`` of a JSONL file; a missing file or a bad line is a :class:`SpecError` naming it."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    with f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SpecError(f"{path}:{n}: not a JSON line ({e.msg})") from None
                if not isinstance(row, dict):
                    raise SpecError(f"{path}:{n}: a row must be a JSON object")
                yield n, row


def read_pairs(path) -> List[Dict[str, Any]]:
    """Read query/positive JSONL rows and group them by query text: ``[{"query", "positives", **extra}]``.
    Accepted keys: query|anchor|question|q and positives (list) | positive | pos | document | answer."""
    groups: Dict[str, Dict[str, Any]] = {}
    for n, r in _jsonl(path):
        qk = next((k for k in _QUERY_KEYS if k in r), None)
        pk = next((k for k in _POS_KEYS if k in r), None)
        if qk is None or pk is None:
            raise SpecError(f"{path}:{n}: need a query key {_QUERY_KEYS} and a positive key {_POS_KEYS}")
        ps = r[pk] if isinstance(r[pk], list) else [r[pk]]
        g = groups.setdefault(r[qk], {"query": r[qk], "positives": [],
                                      **{k: v for k, v in r.items() if k not in (qk, pk, "negatives")}})
        g["positives"] += [p for p in ps if p not in g["positives"]]
    return list(groups.values())


def read_corpus(path, with_ids: bool = False):
    """Corpus texts from ``.txt`` (one per line) or JSONL (``text`` with optional ``title``, BEIR-style).
    ``with_ids``: ``(texts, ids)``, ids from ``_id`` / ``id`` (JSONL) or the line number."""
    path = Path(path)
    texts, ids = [], []
    if path.suffix == ".txt":
        if not path.is_file():
            raise SpecError(f"{path}: file not found")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    texts.append(line.rstrip("\n"))
                    ids.append(str(n))
    else:
        for n, r in _jsonl(path):
            t = r.get("text", "")
            texts.append(f"{r['title']}. {t}" if r.get("title") else t)
            ids.append(str(r.get("_id", r.get("id", n))))
    return (texts, ids) if with_ids else texts


MINED_FIELDS = FieldsSpec(query="query", positive="positives", negatives="negatives",
                          positive_scores="positive_scores", negative_scores="negative_scores")
DEFAULT_INSTRUCTION = "Given a query, retrieve relevant documents"


def mined_spec(data_path, spec_path, *, name: Optional[str] = None, instruction: Optional[str] = None,
               stages: Sequence[str] = (), description: str = "",
               provenance: Optional[Dict[str, Any]] = None) -> DataSpec:
    """The retrieval spec of a mined JSONL file (``source.path`` relative to ``spec_path``'s folder), validated."""
    data_path, spec_path = Path(data_path), Path(spec_path)
    rel = os.path.relpath(data_path.resolve(), spec_path.resolve().parent)
    spec = DataSpec(name=name or data_path.stem, task="retrieval", instruction=instruction or DEFAULT_INSTRUCTION,
                    source=SourceSpec(path=Path(rel).as_posix(),
                                      format=None if data_path.suffix == ".jsonl" else "jsonl"),
                    fields=dataclasses.replace(MINED_FIELDS), stages=list(stages), description=description,
                    provenance=dict(provenance or {}))
    parse_spec(spec.to_dict(), str(spec_path))  # a bad name/instruction fails here, before any mining
    return spec


def write_mined(records: List[Dict[str, Any]], out_path, spec: DataSpec, spec_path, *, comment: str = "") -> Path:
    """Write ``records`` as JSONL at ``out_path`` and ``spec`` at ``spec_path``, each replaced atomically (a
    failure keeps the earlier files); returns the spec path."""
    out_path, spec_path = Path(out_path), Path(spec_path)
    if out_path.resolve() == spec_path.resolve():
        raise SpecError(f"{out_path}: the mined data and its spec would be the same file")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return write_spec(spec, spec_path, comment=comment)


def mine_file(teacher, input_path, out_path, *, corpus_path=None, rule: Optional[MiningRule] = None,
              instruction: Optional[str] = None, spec_path=None, name: Optional[str] = None,
              spec_instruction: Optional[str] = None, stages: Sequence[str] = (), description: str = "",
              provenance: Optional[Dict[str, Any]] = None, comment: str = "", **kw) -> Dict[str, Any]:
    """Read pairs (and a corpus), mine, write the JSONL and its data spec. Returns the stats dict.

    ``instruction`` is the teacher's query instruction; the spec's is ``spec_instruction``, else ``instruction``,
    else :data:`DEFAULT_INSTRUCTION`. ``spec_path`` defaults to ``<out_path>.yaml``. ``provenance`` entries
    override the recorded ones (teacher, rule, input, corpus, counts)."""
    rule = rule or MiningRule()
    out_path = Path(out_path)
    spec_path = Path(spec_path) if spec_path else out_path.with_suffix(".yaml")
    spec = mined_spec(out_path, spec_path, name=name, instruction=spec_instruction or instruction, stages=stages,
                      description=description)
    rows = read_pairs(input_path)
    corpus, corpus_ids = read_corpus(corpus_path, with_ids=True) if corpus_path else (None, None)
    stats: Dict[str, Any] = {}
    ranks = kw.pop("ranks", None) or Ranks()
    cfg = kw.pop("search_config", None) or SearchConfig(index="flat" if kw.pop("use_faiss", False) else "exact")
    recs = mine_hard_negatives(teacher, [r["query"] for r in rows], [r["positives"] for r in rows], corpus,
                               rule=rule, instruction=instruction, stats=stats, corpus_ids=corpus_ids,
                               search_config=cfg, ranks=ranks, **kw)
    if ranks.rank != 0:  # the other ranks encoded their share; rank 0 searched and writes
        return stats
    for rec, row in zip(recs, rows):
        for k, v in row.items():
            rec.setdefault(k, v)
    # no timings: re-mining the same inputs writes the same spec
    used = instruction if getattr(teacher, "use_instructions", True) else None  # e.g. MiniLM ignores it
    spec.provenance = {"tool": "nvembed.mining", "teacher": getattr(teacher, "name", ""),
                       "teacher_instruction": used, **rule.to_dict(), "input": str(input_path),
                       "corpus": str(corpus_path) if corpus_path else "positives pool",
                       **cfg.to_dict(), "store_dtype": kw.get("store_dtype", "float32"),
                       "positive_reference": "min positive score",
                       **{k: v for k, v in stats.items() if k not in ("seconds", "search_seconds", "recall")},
                       **(provenance or {})}
    stats["spec"] = str(write_mined(recs, out_path, spec, spec_path, comment=comment))
    return stats
