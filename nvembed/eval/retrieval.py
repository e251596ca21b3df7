"""Retrieval evaluation on BEIR-format folders.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/<split>.tsv`` (header ``query-id corpus-id score``). Dense retrieval uses the memory-bounded
:func:`nvembed.mining.topk.chunked_topk`; metrics come from ``pytrec_eval`` (nDCG@10, recall@100, MRR@10).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Dict, Optional, Tuple

from nvembed.data.sources import json_object
from nvembed.errors import UserError
from nvembed.mining.topk import chunked_topk

Corpus = Dict[str, Dict[str, str]]
Queries = Dict[str, str]
Qrels = Dict[str, Dict[str, int]]
Run = Dict[str, Dict[str, float]]


class BeirError(UserError, ValueError):
    """A BEIR folder is incomplete or one of its lines is invalid; the message names the file, line and field."""

    kind = "data"


def _jsonl_rows(path: Path, required: Tuple[str, ...]):
    """(line number, record) of a JSONL file; a malformed line or a missing/empty required field is an error."""
    if not path.is_file():
        raise BeirError(f"{path}: file not found (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r, problem = json_object(line)
            if problem:
                raise BeirError(f"{path}:{n}: {problem}")
            for key in required:
                v = r.get(key)
                if v is None or (key == "_id" and str(v) == "") or (key != "_id" and not isinstance(v, str)):
                    what = "missing" if key not in r else f"not a {'string' if key != '_id' else 'value'} ({v!r})"
                    raise BeirError(f"{path}:{n}: field '{key}' {what}")
            yield n, r


def load_beir(folder, split: str = "test", *, allow_missing_docs: bool = False,
              log=None) -> Tuple[Corpus, Queries, Qrels]:
    """Load a BEIR folder, checking every line (errors name the file, line and field). Queries without judgments in
    ``split`` are dropped (queries.jsonl usually holds every split's queries).

    A judgment naming a document absent from the corpus (or a query absent from queries.jsonl) is an error: it would
    silently lower every score. With ``allow_missing_docs`` such judgments are dropped, and their count is reported
    through ``log``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirError(f"{folder}: no such BEIR folder")
    corpus: Corpus = {}
    corpus_path = folder / "corpus.jsonl"
    for _, r in _jsonl_rows(corpus_path, ("_id", "text")):
        corpus[str(r["_id"])] = {"title": r.get("title", "") or "", "text": r["text"]}
    if not corpus:
        raise BeirError(f"{corpus_path}: no documents")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(x.stem for x in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise BeirError(f"{qrels_path}: file not found (split '{split}'; qrels splits here: {have or 'none'})")
    qrels: Qrels = {}
    where: Dict[Tuple[str, str], int] = {}
    with open(qrels_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            n = reader.line_num
            if not row or not "".join(row).strip() or row[0] == "query-id":
                continue
            if len(row) < 3:
                raise BeirError(f"{qrels_path}:{n}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                                f"got {len(row)}")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise BeirError(f"{qrels_path}:{n}: field 'score' is not a number ({row[2]!r})") from None
            qrels.setdefault(str(row[0]), {})[str(row[1])] = score
            where.setdefault((str(row[0]), str(row[1])), n)
    queries_path = folder / "queries.jsonl"
    all_queries = {str(r["_id"]): r["text"] for _, r in _jsonl_rows(queries_path, ("_id", "text"))}
    if not all_queries:
        raise BeirError(f"{queries_path}: no queries")
    missing = [(where[(q, d)], q, d, "query" if q not in all_queries else "document")
               for q, docs in qrels.items() for d in docs if q not in all_queries or d not in corpus]
    if missing:
        missing.sort()
        n, q, d, what = missing[0]
        name = f"query id '{q}' (not in {queries_path.name})" if what == "query" else \
            f"corpus-id '{d}' (not in {corpus_path.name})"
        if not allow_missing_docs:
            raise BeirError(f"{qrels_path}:{n}: {name}; {len(missing)} judgment(s) name ids absent from the folder "
                            f"and would silently lower the scores (pass --allow-missing-docs to drop them)")
        if log:
            log(f"[beir] {qrels_path}: dropped {len(missing)} judgment(s) naming ids absent from the folder "
                f"(first: line {n}, {name})")
        for _, q, d, _ in missing:
            qrels[q].pop(d, None)
        qrels = {q: docs for q, docs in qrels.items() if docs}
    queries: Queries = {q: t for q, t in all_queries.items() if q in qrels}
    if not queries:
        raise BeirError(f"{qrels_path}: no query of {queries_path} has a judgment here (split '{split}')")
    qrels = {q: d for q, d in qrels.items() if q in queries}
    if not any(s > 0 for docs in qrels.values() for s in docs.values()):
        raise BeirError(f"{qrels_path}: no judgment has a score >= 1 (nothing is relevant)")
    return corpus, queries, qrels


def subset_beir(corpus: Corpus, queries: Queries, qrels: Qrels, *, max_queries: Optional[int] = None,
                max_corpus: Optional[int] = None, max_judged_docs: Optional[int] = None,
                seed: int = 0) -> Tuple[Corpus, Queries, Qrels]:
    """Deterministic subset: up to ``max_queries`` judged queries in a seeded random order; a corpus of every
    document judged relevant for them plus random other documents up to ``max_corpus`` (judged documents are
    always kept, even past it).

    ``max_judged_docs`` (for small demo corpora of collections with many judgments per query, e.g. CISI): a query
    is skipped if it would push the number of distinct judged documents past this budget. This favours queries
    with fewer judgments (a bias, acceptable for a quick progress signal, not for reported numbers)."""
    rng = random.Random(seed)
    qids = sorted(queries, key=_natural)
    if max_judged_docs:
        order = list(qids)
        rng.shuffle(order)
        picked, judged = [], set()
        for q in order:
            rel = {d for d, s in qrels[q].items() if s > 0 and d in corpus}
            if len(judged | rel) <= max_judged_docs:
                picked.append(q)
                judged |= rel
            if max_queries and len(picked) >= max_queries:
                break
        qids = sorted(picked, key=_natural)
    elif max_queries and len(qids) > max_queries:
        qids = sorted(rng.sample(qids, max_queries), key=_natural)
    queries = {q: queries[q] for q in qids}
    qrels = {q: qrels[q] for q in qids}
    if max_corpus and len(corpus) > max_corpus:
        keep = {d for docs in qrels.values() for d, s in docs.items() if s > 0 and d in corpus}
        others = sorted((d for d in corpus if d not in keep), key=_natural)
        n_more = max(0, max_corpus - len(keep))
        keep |= set(rng.sample(others, min(n_more, len(others))))
        corpus = {d: corpus[d] for d in sorted(keep, key=_natural)}
    return corpus, queries, qrels


def _natural(x: str):
    return (0, int(x), "") if x.isdigit() else (1, 0, x)


def doc_text(doc: Dict[str, str], max_chars: Optional[int] = None) -> str:
    t = (doc.get("title", "") + ". " + doc.get("text", "")).strip(". ") if doc.get("title") else doc.get("text", "")
    return t[:max_chars] if max_chars else t


def dense_search(encoder, corpus: Corpus, queries: Queries, *, instruction: Optional[str] = None, k: int = 100,
                 batch_size: int = 32, max_doc_chars: Optional[int] = None, show_progress: bool = False) -> Run:
    doc_ids = list(corpus)
    q_ids = list(queries)
    d_emb = encoder.encode([doc_text(corpus[d], max_doc_chars) for d in doc_ids], instruction=None,
                           batch_size=batch_size, show_progress=show_progress)
    q_emb = encoder.encode([queries[q] for q in q_ids], instruction=instruction, batch_size=batch_size,
                           show_progress=show_progress)
    scores, idx = chunked_topk(q_emb, d_emb, k)
    return {q: {doc_ids[j]: float(s) for s, j in zip(scores[i], idx[i])} for i, q in enumerate(q_ids)}


def bm25_search(bm25, corpus: Corpus, queries: Queries, *, k: int = 100, max_doc_chars: Optional[int] = None) -> Run:
    doc_ids = list(corpus)
    bm25.index(doc_ids, [doc_text(corpus[d], max_doc_chars) for d in doc_ids])
    q_ids = list(queries)
    res = bm25.search([queries[q] for q in q_ids], k=k)
    return {q: r for q, r in zip(q_ids, res)}


def evaluate_run(qrels: Qrels, run: Run) -> Dict[str, float]:
    """Mean nDCG@10, recall@100 and MRR@10 over the judged queries (pytrec_eval / trec_eval semantics: relevant =
    score >= 1, nDCG gain = graded score). A query missing from ``run`` counts as 0. MRR@10 is trec_eval's
    ``recip_rank`` on the run cut to each query's top 10."""
    import pytrec_eval

    qrels = {q: {d: int(s) for d, s in docs.items()} for q, docs in qrels.items()}
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in qrels}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda x: (-x[1], x[0]))[:10]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    n = len(qrels)
    out = {"ndcg@10": sum(full[q]["ndcg_cut_10"] for q in full) / n,
           "recall@100": sum(full[q]["recall_100"] for q in full) / n,
           "mrr@10": sum(rr[q]["recip_rank"] for q in rr) / n}
    return out


def evaluate_retrieval(model, folder, *, instruction: Optional[str] = None, split: str = "test",
                       max_queries: Optional[int] = None, max_corpus: Optional[int] = None,
                       max_judged_docs: Optional[int] = None, max_doc_chars: Optional[int] = None,
                       max_query_chars: Optional[int] = None,
                       seed: int = 0, batch_size: int = 32, k: int = 100,
                       show_progress: bool = False, allow_missing_docs: bool = False, log=None,
                       data: Optional[Tuple[Corpus, Queries, Qrels]] = None) -> Dict[str, float]:
    """Evaluate ``model`` (a TextEncoder or a BM25Retriever) on a BEIR folder; returns the metrics plus sizes.
    ``data``: the folder already loaded with :func:`load_beir` (it is not read again)."""
    from nvembed.eval.encoders import BM25Retriever

    corpus, queries, qrels = data or load_beir(folder, split, allow_missing_docs=allow_missing_docs, log=log)
    corpus, queries, qrels = subset_beir(corpus, queries, qrels, max_queries=max_queries, max_corpus=max_corpus,
                                         max_judged_docs=max_judged_docs, seed=seed)
    if not queries:  # e.g. max_judged_docs below every query's judgments: no mean to take
        raise BeirError(f"{folder}: no query left after subsetting (max_queries={max_queries}, "
                        f"max_judged_docs={max_judged_docs})")
    if max_query_chars:
        queries = {q: t[:max_query_chars] for q, t in queries.items()}
    if isinstance(model, BM25Retriever):
        run = bm25_search(model, corpus, queries, k=k, max_doc_chars=max_doc_chars)
    else:
        run = dense_search(model, corpus, queries, instruction=instruction, k=k, batch_size=batch_size,
                           max_doc_chars=max_doc_chars, show_progress=show_progress)
    res = evaluate_run(qrels, run)
    res.update({"num_queries": len(queries), "num_docs": len(corpus)})
    return res
