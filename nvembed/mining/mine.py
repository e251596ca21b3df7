"""Hard-negative mining with a teacher encoder and positive-aware rules.

Pipeline: deduplicate the corpus by text (positives are added to it; by hash, the texts stay on disk:
:mod:`~nvembed.mining.texts`) -> encode corpus and queries into embedding
stores on disk (:mod:`~nvembed.mining.store`: written chunk by chunk, resumable, sharded over the ranks of an
accelerate launch) -> rank 0 searches the corpus store per block of queries (:mod:`~nvembed.mining.index`: streamed
exact top-k, or a FAISS IVF / IVF-PQ / HNSW index filled chunk by chunk, with its recall@k against exact search
measured on a sample of queries) -> :func:`~nvembed.mining.rules.select_negatives` per query -> each record
written as it is mined (its texts read back from the input files).

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
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from tqdm.auto import tqdm

from nvembed.data.sources import jsonl_objects, text_lines
from nvembed.data.spec import DataSpec, FieldsSpec, SourceSpec, SpecError, parse_spec, write_spec
from nvembed.mining.cache import store_folder
from nvembed.mining.index import SearchConfig, build_index, estimate_recall, search
from nvembed.mining.rules import MiningRule, select_negatives
from nvembed.mining.store import StoreError, encode_to_store
from nvembed.mining.texts import (MiningTexts, corpus_text, from_files, from_lists, pair_keys, pair_positives,
                                  pass_through, strip_eol)


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
    if len(queries) != len(positives):
        raise ValueError("queries and positives must have the same length")
    records: List[Dict[str, Any]] = []
    texts = from_lists(queries, positives, corpus, corpus_ids)
    _mine(teacher, texts, lambda qi, rec: records.append(rec), rule=rule, instruction=instruction,
          batch_size=batch_size, cache_dir=cache_dir, search_config=search_config, use_faiss=use_faiss,
          store_dtype=store_dtype, encode_chunk_size=encode_chunk_size, query_block_size=query_block_size,
          query_chunk_size=query_chunk_size, doc_chunk_size=doc_chunk_size, exclude_query_text=exclude_query_text,
          show_progress=show_progress, stats=stats, ranks=ranks)
    return records


def _mine(teacher, texts: MiningTexts, emit: Callable[[int, Dict[str, Any]], None], *,
          rule: Optional[MiningRule] = None, instruction: Optional[str] = None, batch_size: int = 32,
          cache_dir: Optional[str] = None, search_config: Optional[SearchConfig] = None, use_faiss: bool = False,
          store_dtype: str = "float32", encode_chunk_size: int = 4096, query_block_size: int = 4096,
          query_chunk_size: Optional[int] = None, doc_chunk_size: Optional[int] = None,
          exclude_query_text: bool = True, show_progress: bool = True, stats: Optional[Dict[str, Any]] = None,
          ranks: Optional[Ranks] = None) -> None:
    """Encode, search and select; each query's record goes to ``emit(query index, record)`` in query order."""
    rule = rule or MiningRule()
    cfg = _search_config(search_config, use_faiss, query_chunk_size, doc_chunk_size)
    ranks = ranks or Ranks()
    t0 = time.perf_counter()
    n_queries, docs = len(texts.queries), texts.docs
    if np.any(np.diff(texts.pos_ptr) == 0) and rule.rule in ("topk_percpos", "topk_marginpos"):
        raise ValueError(f"{rule.rule} needs at least one positive per query")
    if not n_queries:
        return
    if not len(docs):
        raise ValueError("no documents to mine from: give a corpus or positives")
    if cache_dir is None and ranks.world > 1:
        raise StoreError("several processes share the embeddings through a folder: pass a cache folder (--cache)")
    with tempfile.TemporaryDirectory(prefix="nvembed-mine-") as tmp:
        root = cache_dir if cache_dir is not None else tmp
        common = dict(dtype=store_dtype, chunk_size=encode_chunk_size, batch_size=batch_size, rank=ranks.rank,
                      world=ranks.world, barrier=ranks.barrier, show_progress=show_progress)
        # keyed on the texts' digests (texts.py): no text is read back to name a store
        d_store = encode_to_store(teacher, docs, store_folder(root, teacher, None, None, store_dtype,
                                                              hashes=texts.doc_hash),
                                  ids=texts.doc_ids, desc="encode corpus", **common)
        q_store = encode_to_store(teacher, texts.queries, store_folder(root, teacher, None, instruction, store_dtype,
                                                                        hashes=texts.query_hash),
                                  instruction=instruction, desc="encode queries", **common)
        if ranks.rank != 0:
            return
        t_search = time.perf_counter()
        run_stats = _search_and_select(texts, d_store, q_store, rule, cfg, query_block_size, exclude_query_text,
                                       show_progress, emit)
    if stats is not None:
        stats.update({"num_queries": n_queries, "corpus_size": len(docs), **run_stats,
                      "search_seconds": round(time.perf_counter() - t_search, 2),
                      "seconds": round(time.perf_counter() - t0, 2)})


def _search_config(search_config: Optional[SearchConfig], use_faiss: bool = False,
                   query_chunk_size: Optional[int] = None, doc_chunk_size: Optional[int] = None) -> SearchConfig:
    """The search settings of a run (a copy: the caller's config is not changed)."""
    cfg = dataclasses.replace(search_config or SearchConfig(index="flat" if use_faiss else "exact"))
    if query_chunk_size:
        cfg.query_chunk_size = query_chunk_size
    if doc_chunk_size:
        cfg.doc_chunk_size = doc_chunk_size
    return cfg


def _search_and_select(texts: MiningTexts, d_store, q_store, rule, cfg, query_block_size, exclude_query_text,
                       show_progress, emit):
    n_docs = len(texts.docs)
    max_pos = int(np.diff(texts.pos_ptr).max(initial=0))
    extra = 1 if exclude_query_text else 0
    k = n_docs if rule.range_max is None else min(n_docs, rule.range_max + max_pos + extra)
    ann = build_index(d_store, cfg)
    run_stats: Dict[str, Any] = {"k_retrieved": k}
    if cfg.approximate:
        run_stats["recall"] = estimate_recall(ann, q_store, d_store, k, cfg)
    n_short = 0
    blocks = range(0, len(texts.queries), query_block_size)
    for b in tqdm(blocks, desc="mine", disable=not show_progress, total=len(blocks)):
        qb = q_store[b:b + query_block_size]
        scores, idx = search(qb, d_store, k, cfg, ann)
        pos_ids = [texts.positives(b + j) for j in range(len(qb))]
        pos_rows = d_store.take([p for pids in pos_ids for p in pids])
        at = 0
        for j, pids in enumerate(pos_ids):
            qi = b + j
            pscores = [float(s) for s in pos_rows[at:at + len(pids)] @ qb[j]]
            at += len(pids)
            qd = int(texts.query_doc[qi])
            excl = [qd] if exclude_query_text and qd >= 0 else []
            found = idx[j] >= 0  # an approximate index may return fewer than k
            neg_ids, neg_scores = select_negatives(idx[j][found], scores[j][found], pids, pscores, rule,
                                                   query_index=qi, excluded_ids=excl)
            n_short += len(neg_ids) < rule.num_negatives
            # texts are read from disk here, a few per query, and leave with the record
            emit(qi, {"query": texts.queries[qi], "positives": [texts.docs[p] for p in pids],
                      "negatives": [texts.docs[n] for n in neg_ids],
                      "negative_scores": [round(s, 6) for s in neg_scores],
                      "positive_scores": [round(s, 6) for s in pscores]})
    run_stats["queries_with_fewer_negatives"] = n_short
    return run_stats


# ----------------------------------------------------------------------------------------------- file helpers

def read_pairs(path) -> List[Dict[str, Any]]:
    """Read query/positive JSONL rows and group them by query text: ``[{"query", "positives", **extra}]``, in RAM
    (small files; :func:`mine_file` keeps only offsets, :mod:`~nvembed.mining.texts`).
    Accepted keys: query|anchor|question|q and positives (list) | positive | pos | document | answer."""
    groups: Dict[str, Dict[str, Any]] = {}
    for _, n, r in jsonl_objects(path):
        qk, pk = pair_keys(path, n, r)
        g = groups.setdefault(r[qk], {"query": r[qk], "positives": [], **pass_through(r, qk, pk)})
        g["positives"] += [p for p in pair_positives(r, pk) if p not in g["positives"]]
    return list(groups.values())


def read_corpus(path, with_ids: bool = False):
    """Corpus texts from ``.txt`` (one per line) or JSONL (``text`` with optional ``title``, BEIR-style), in RAM.
    ``with_ids``: ``(texts, ids)``, ids from ``_id`` / ``id`` (JSONL) or the line number."""
    texts, ids = [], []
    txt = Path(path).suffix == ".txt"
    for _, n, r in text_lines(path) if txt else jsonl_objects(path):
        texts.append(strip_eol(r) if txt else corpus_text(r))
        ids.append(str(n) if txt else str(r.get("_id", r.get("id", n))))
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


class _Writer:
    """Writes JSONL records as they come to ``.<name>.tmp`` beside ``out_path``; :meth:`commit` renames it into place
    (a failure before keeps the earlier file and removes the temporary one)."""

    def __init__(self, out_path):
        self.out_path = Path(out_path)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_path.with_name(f".{self.out_path.name}.tmp")
        self.f = open(self.tmp, "w", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.out_path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _check_paths(out_path, spec_path) -> None:
    if Path(out_path).resolve() == Path(spec_path).resolve():
        raise SpecError(f"{out_path}: the mined data and its spec would be the same file")


def write_mined(records: Iterable[Dict[str, Any]], out_path, spec: DataSpec, spec_path, *,
                comment: str = "") -> Path:
    """Write ``records`` as JSONL at ``out_path`` and ``spec`` at ``spec_path``, each replaced atomically (a
    failure keeps the earlier files); returns the spec path."""
    _check_paths(out_path, spec_path)
    w = _Writer(out_path)
    try:
        for r in records:
            w.write(r)
    except BaseException:
        w.abort()
        raise
    w.commit()
    return write_spec(spec, spec_path, comment=comment)


def mine_file(teacher, input_path, out_path, *, corpus_path=None, rule: Optional[MiningRule] = None,
              instruction: Optional[str] = None, spec_path=None, name: Optional[str] = None,
              spec_instruction: Optional[str] = None, stages: Sequence[str] = (), description: str = "",
              provenance: Optional[Dict[str, Any]] = None, comment: str = "", **kw) -> Dict[str, Any]:
    """Read pairs (and a corpus), mine, write the JSONL and its data spec. Returns the stats dict.

    Rows with the same query are one query (positives merged, pass-through fields from its first row). The input
    files are scanned once for offsets and hashes (:func:`~nvembed.mining.texts.from_files`); texts are read back
    per block of results and the records written as they are mined, to a temporary file renamed at the end.

    ``instruction`` is the teacher's query instruction; the spec's is ``spec_instruction``, else ``instruction``,
    else :data:`DEFAULT_INSTRUCTION`. ``spec_path`` defaults to ``<out_path>.yaml``. ``provenance`` entries
    override the recorded ones (teacher, rule, input, corpus, counts)."""
    rule = rule or MiningRule()
    out_path = Path(out_path)
    spec_path = Path(spec_path) if spec_path else out_path.with_suffix(".yaml")
    spec = mined_spec(out_path, spec_path, name=name, instruction=spec_instruction or instruction, stages=stages,
                      description=description)
    _check_paths(out_path, spec_path)
    texts = from_files(input_path, corpus_path)
    stats: Dict[str, Any] = {}
    ranks = kw.pop("ranks", None) or Ranks()
    cfg = _search_config(kw.pop("search_config", None), kw.pop("use_faiss", False), kw.pop("query_chunk_size", None),
                         kw.pop("doc_chunk_size", None))
    writer: Optional[_Writer] = None

    def emit(qi: int, rec: Dict[str, Any]) -> None:
        nonlocal writer
        if writer is None:  # opened at the first record: ranks other than 0 and failed encodes write nothing
            writer = _Writer(out_path)
        for k, v in texts.extras(qi).items():
            rec.setdefault(k, v)
        writer.write(rec)

    try:
        _mine(teacher, texts, emit, rule=rule, instruction=instruction, stats=stats, search_config=cfg, ranks=ranks,
              **kw)
        if ranks.rank != 0:  # the other ranks encoded their share; rank 0 searched and writes
            return stats
        if writer is None:  # no query: an empty file, as before
            writer = _Writer(out_path)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        texts.close()
    # no timings: re-mining the same inputs writes the same spec
    used = instruction if getattr(teacher, "use_instructions", True) else None  # e.g. MiniLM ignores it
    spec.provenance = {"tool": "nvembed.mining", "teacher": getattr(teacher, "name", ""),
                       "teacher_instruction": used, **rule.to_dict(), "input": str(input_path),
                       "corpus": str(corpus_path) if corpus_path else "positives pool",
                       **cfg.to_dict(), "store_dtype": kw.get("store_dtype", "float32"),
                       "positive_reference": "min positive score",
                       **{k: v for k, v in stats.items() if k not in ("seconds", "search_seconds", "recall")},
                       **(provenance or {})}
    stats["spec"] = str(write_spec(spec, spec_path, comment=comment))
    return stats
