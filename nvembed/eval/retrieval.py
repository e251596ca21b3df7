"""Retrieval evaluation on BEIR-format folders, the corpus kept on disk.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/<split>.tsv`` (header ``query-id corpus-id score``). Metrics come from ``pytrec_eval`` (nDCG@10, recall@100,
MRR@10).

Memory (issue #17): :func:`open_beir` scans ``corpus.jsonl`` once, checking every line, and keeps per document only
the byte offset of its line and a 16-byte digest of its id (numpy, ~32 bytes a document: :class:`BeirCorpus`).
Dense search reads the texts back one chunk at a time, writes their embeddings to an
:class:`~nvembed.mining.store.EmbeddingStore` on disk as they are encoded, and searches that store chunk by chunk
(:func:`~nvembed.mining.topk.chunked_topk`, or a FAISS index of :mod:`nvembed.mining.index` for very large corpora);
ids are read back only for the documents retrieved. Queries and qrels stay in memory (dicts): they are small next to
the corpus (MS MARCO dev: 7k queries against 8.8M passages). BM25 (:mod:`nvembed.eval.bm25`) reads the texts back a
chunk at a time too, twice (document frequencies and lengths, then weights of the query terms), with bm25s's scores.
:func:`load_beir` gives the folder as dicts (small folders, the MTEB wrapper).
"""

from __future__ import annotations

import csv
import json
import random
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from nvembed.data.sources import jsonl_objects
from nvembed.data.spec import SpecError
from nvembed.mining.texts import digest, first_seen
from nvembed.mining.topk import chunked_topk

Corpus = Dict[str, Dict[str, str]]
Queries = Dict[str, str]
Qrels = Dict[str, Dict[str, int]]
Run = Dict[str, Dict[str, float]]


class BeirError(SpecError):
    """A BEIR folder is incomplete or one of its lines is invalid; the message names the file, line and field."""

    kind = "data"


def _rows(path: Path, required: Tuple[str, ...]) -> Iterator[Tuple[int, dict]]:
    """(byte offset, record) of a JSONL file; a malformed line or a missing/empty required field is an error."""
    if not path.is_file():
        raise BeirError(f"{path}: file not found (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    for off, n, r in jsonl_objects(path):
        for key in required:
            v = r.get(key)
            if v is None or (key == "_id" and str(v) == "") or (key != "_id" and not isinstance(v, str)):
                what = "missing" if key not in r else f"not a {'string' if key != '_id' else 'value'} ({v!r})"
                raise BeirError(f"{path}:{n}: field '{key}' {what}")
        yield off, r


def _doc(r: dict) -> Dict[str, str]:
    return {"title": r.get("title", "") or "", "text": r["text"]}


def _digests(ids) -> np.ndarray:
    return np.frombuffer(b"".join(digest(str(d)) for d in ids), dtype="S16")


class BeirCorpus:
    """The documents of a ``corpus.jsonl``, on disk: document ``i`` is the line at ``offsets[i]``; ``hashes[i]`` is
    the digest of its id (lookups by id without a dict). A repeated id is one document at its first position holding
    its last line, as a dict filled line by line would."""

    def __init__(self, path, offsets: np.ndarray, hashes: np.ndarray):
        self.path, self.offsets, self.hashes = Path(path), offsets, hashes
        self._by_hash = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._by_hash]

    @classmethod
    def scan(cls, path) -> "BeirCorpus":
        """Read ``path`` once, checking every line (errors name file:line:field)."""
        offs, buf = array("q"), bytearray()
        for off, r in _rows(Path(path), ("_id", "text")):
            offs.append(off)
            buf += digest(str(r["_id"]))
        hashes = np.frombuffer(bytes(buf), dtype="S16")
        first, label, _, _ = first_seen(hashes)
        last = np.zeros(len(first), dtype=np.int64)
        np.maximum.at(last, label, np.arange(len(hashes)))
        return cls(path, np.frombuffer(offs, dtype=np.int64)[last], hashes[first])

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 where the corpus has no such id."""
        h = _digests(ids)
        if not len(self) or not len(h):
            return np.full(len(h), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, h), len(self) - 1)
        return np.where(self._sorted[at] == h, self._by_hash[at], -1)

    def __contains__(self, doc_id) -> bool:
        return bool(self.rows([doc_id])[0] >= 0)

    def records(self, rows) -> Iterator[dict]:
        """The JSON record of each row, read back from the file (in the order given)."""
        with open(self.path, "rb") as f:
            for r in rows:
                f.seek(int(self.offsets[r]))
                yield json.loads(f.readline())

    def ids(self, rows) -> List[str]:
        return [str(r["_id"]) for r in self.records(rows)]

    def texts(self, max_chars: Optional[int] = None) -> "DocTexts":
        return DocTexts(self, max_chars)

    def take(self, rows) -> "BeirCorpus":
        rows = np.asarray(rows, dtype=np.int64)
        return BeirCorpus(self.path, self.offsets[rows], self.hashes[rows])

    def to_dict(self) -> Corpus:
        return {str(r["_id"]): _doc(r) for r in self.records(range(len(self)))}

    def natural_order(self, block: int = 65536) -> np.ndarray:
        """Rows sorted by :func:`_natural` of their ids (ties in row order), ids read back a block at a time into
        numpy (digit ids by value: length of the canonical number, then its digits)."""
        kinds, lens, keys = [], [], []
        for lo in range(0, len(self), block):
            ids = self.ids(range(lo, min(len(self), lo + block)))
            canon = [_canonical_int(d) for d in ids]
            kinds.append(np.array([c is None for c in canon], dtype=np.int8))
            lens.append(np.array([len(c) if c is not None else 0 for c in canon], dtype=np.int64))
            keys.append(np.array([(c if c is not None else d).encode("utf-8", "surrogatepass")
                                  for c, d in zip(canon, ids)], dtype=bytes))
        if not keys:
            return np.zeros(0, dtype=np.int64)
        width = max(k.dtype.itemsize for k in keys)
        key = np.concatenate([k.astype(f"S{width}") for k in keys])  # UTF-8 byte order = code point order
        return np.lexsort((np.arange(len(self)), key, np.concatenate(lens), np.concatenate(kinds)))


def _canonical_int(x: str) -> Optional[str]:
    if not x.isdigit():
        return None
    try:
        return str(int(x))
    except ValueError:  # a digit int() does not read (e.g. superscripts): compared as text
        return None


class DocTexts(Sequence):
    """``"title. text"`` of each document of a :class:`BeirCorpus`, read from disk on access (a slice opens the file
    once): what the embedding store encodes chunk by chunk."""

    def __init__(self, corpus: BeirCorpus, max_chars: Optional[int] = None):
        self.corpus, self.max_chars = corpus, max_chars

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [doc_text(_doc(r), self.max_chars) for r in self.corpus.records(range(*i.indices(len(self))))]
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(i)
        return self[j:j + 1][0]


@dataclass
class BeirFolder:
    """A checked BEIR folder: the corpus on disk, the judged queries and their qrels in memory."""

    folder: Path
    """The folder read."""
    corpus: BeirCorpus
    """Offsets and id digests of ``corpus.jsonl`` (texts read back when encoded)."""
    queries: Queries
    """Query id -> text, for the queries judged in the split."""
    qrels: Qrels
    """Query id -> {document id: score}."""


def open_beir(folder, split: str = "test", *, allow_missing_docs: bool = False, log=None) -> BeirFolder:
    """Check a BEIR folder line by line (errors name the file, line and field) and open its corpus on disk. Queries
    without judgments in ``split`` are dropped (queries.jsonl usually holds every split's queries).

    A judgment naming a document absent from the corpus (or a query absent from queries.jsonl) is an error: it would
    silently lower every score. With ``allow_missing_docs`` such judgments are dropped, and their count is reported
    through ``log``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirError(f"{folder}: no such BEIR folder")
    corpus_path = folder / "corpus.jsonl"
    corpus = BeirCorpus.scan(corpus_path)
    if not len(corpus):
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
    all_queries = {str(r["_id"]): r["text"] for _, r in _rows(queries_path, ("_id", "text"))}
    if not all_queries:
        raise BeirError(f"{queries_path}: no queries")
    judged = sorted({d for docs in qrels.values() for d in docs})
    absent = {d for d, row in zip(judged, corpus.rows(judged)) if row < 0}
    missing = [(where[(q, d)], q, d, "query" if q not in all_queries else "document")
               for q, docs in qrels.items() for d in docs if q not in all_queries or d in absent]
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
    return BeirFolder(folder, corpus, queries, qrels)


def load_beir(folder, split: str = "test", *, allow_missing_docs: bool = False,
              log=None) -> Tuple[Corpus, Queries, Qrels]:
    """:func:`open_beir` with the corpus read into a dict ``{id: {"title", "text"}}``: for small folders (the MTEB
    wrapper, tests); evaluation itself keeps the corpus on disk."""
    beir = open_beir(folder, split, allow_missing_docs=allow_missing_docs, log=log)
    return beir.corpus.to_dict(), beir.queries, beir.qrels


AnyCorpus = Union[Corpus, BeirCorpus]


def subset_beir(corpus: AnyCorpus, queries: Queries, qrels: Qrels, *, max_queries: Optional[int] = None,
                max_corpus: Optional[int] = None, max_judged_docs: Optional[int] = None,
                seed: int = 0) -> Tuple[AnyCorpus, Queries, Qrels]:
    """Deterministic subset: up to ``max_queries`` judged queries in a seeded random order; a corpus of every
    document judged relevant for them plus random other documents up to ``max_corpus`` (judged documents are
    always kept, even past it), in :func:`_natural` order of their ids. ``corpus`` is a dict or a
    :class:`BeirCorpus` (the same documents are picked either way; the subset has the type given).

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
        judged = sorted({d for docs in qrels.values() for d, s in docs.items() if s > 0})
        if isinstance(corpus, BeirCorpus):
            keep = corpus.rows(judged)
            rows = _sample_docs(corpus.natural_order(), keep[keep >= 0], max_corpus, rng)
            corpus = corpus.take(rows)
        else:
            ids = list(corpus)
            at = {d: i for i, d in enumerate(ids)}
            order = np.array(sorted(range(len(ids)), key=lambda i: _natural(ids[i])), dtype=np.int64)
            rows = _sample_docs(order, np.array([at[d] for d in judged if d in at], dtype=np.int64), max_corpus, rng)
            corpus = {ids[i]: corpus[ids[i]] for i in rows}
    return corpus, queries, qrels


def _sample_docs(order: np.ndarray, keep: np.ndarray, max_corpus: int, rng: random.Random) -> np.ndarray:
    """Rows ``keep`` plus ``max_corpus - len(keep)`` others drawn by ``rng`` from the others in ``order`` (the
    natural order of the ids), returned in that order."""
    chosen = np.zeros(len(order), dtype=bool)
    chosen[keep] = True
    others = order[~chosen[order]]
    n_more = max(0, max_corpus - int(chosen.sum()))
    # sample over positions: random.sample draws the same positions from a range as from the list of ids
    chosen[others[rng.sample(range(len(others)), min(n_more, len(others)))]] = True
    return order[chosen[order]]


def _natural(x: str):
    return (0, int(x), "") if x.isdigit() else (1, 0, x)


def doc_text(doc: Dict[str, str], max_chars: Optional[int] = None) -> str:
    t = (doc.get("title", "") + ". " + doc.get("text", "")).strip(". ") if doc.get("title") else doc.get("text", "")
    return t[:max_chars] if max_chars else t


def dense_search(encoder, corpus: AnyCorpus, queries: Queries, *, instruction: Optional[str] = None, k: int = 100,
                 batch_size: int = 32, max_doc_chars: Optional[int] = None, show_progress: bool = False,
                 search=None, chunk_size: int = 8192, store_dir=None) -> Run:
    """Top-``k`` documents per query. The documents are encoded ``chunk_size`` at a time into an embedding store in
    a temporary folder (under ``store_dir`` if given: it needs ``n x dim x 4`` bytes), searched by
    :func:`chunked_topk` over the store, or by ``search`` (a :class:`~nvembed.mining.index.SearchConfig`: a FAISS
    index built chunk by chunk). A corpus within one chunk is encoded in one call, as before the store."""
    from nvembed.mining.store import encode_to_store

    if isinstance(corpus, BeirCorpus):
        docs: Sequence[str] = corpus.texts(max_doc_chars)
        doc_ids = corpus.ids
    else:
        ids = list(corpus)
        docs = [doc_text(corpus[d], max_doc_chars) for d in ids]
        doc_ids = lambda rows: [ids[r] for r in rows]  # noqa: E731
    q_ids = list(queries)
    with tempfile.TemporaryDirectory(prefix="nvembed-eval-", dir=store_dir) as tmp:
        store = encode_to_store(encoder, docs, Path(tmp) / "corpus", chunk_size=chunk_size, batch_size=batch_size,
                                show_progress=show_progress, desc="encode corpus")
        q_emb = encoder.encode([queries[q] for q in q_ids], instruction=instruction, batch_size=batch_size,
                               show_progress=show_progress)
        if search is None:
            scores, idx = chunked_topk(q_emb, store, k)
        else:
            from nvembed.mining.index import build_index, search as index_search

            scores, idx = index_search(q_emb, store, k, search, build_index(store, search))
    rows = np.unique(idx[idx >= 0])
    rows = rows[np.argsort(corpus.offsets[rows])] if isinstance(corpus, BeirCorpus) else rows  # file order
    name = dict(zip(rows.tolist(), doc_ids(rows)))
    return {q: {name[int(j)]: float(s) for s, j in zip(scores[i], idx[i]) if j >= 0} for i, q in enumerate(q_ids)}


def bm25_search(bm25, corpus: AnyCorpus, queries: Queries, *, k: int = 100,
                max_doc_chars: Optional[int] = None) -> Run:
    """BM25 (a :class:`~nvembed.eval.encoders.BM25Retriever`) over the corpus; a :class:`BeirCorpus` stays on disk:
    its texts are read back ``bm25.chunk_size`` at a time and ids only for the documents retrieved."""
    if isinstance(corpus, BeirCorpus):
        doc_ids, texts = corpus.ids, corpus.texts(max_doc_chars)
    else:
        doc_ids = list(corpus)
        texts = [doc_text(corpus[d], max_doc_chars) for d in doc_ids]
    bm25.index(doc_ids, texts)
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
                       data: Optional[BeirFolder] = None, search=None, chunk_size: int = 8192,
                       store_dir=None) -> Dict[str, float]:
    """Evaluate ``model`` (a TextEncoder or a BM25Retriever) on a BEIR folder; returns the metrics plus sizes.
    ``data``: the folder already opened with :func:`open_beir` (it is not read again). ``search``, ``chunk_size``,
    ``store_dir``: see :func:`dense_search`."""
    from nvembed.eval.encoders import BM25Retriever

    beir = data or open_beir(folder, split, allow_missing_docs=allow_missing_docs, log=log)
    corpus, queries, qrels = subset_beir(beir.corpus, beir.queries, beir.qrels, max_queries=max_queries,
                                         max_corpus=max_corpus, max_judged_docs=max_judged_docs, seed=seed)
    if not queries:  # e.g. max_judged_docs below every query's judgments: no mean to take
        raise BeirError(f"{folder}: no query left after subsetting (max_queries={max_queries}, "
                        f"max_judged_docs={max_judged_docs})")
    if max_query_chars:
        queries = {q: t[:max_query_chars] for q, t in queries.items()}
    if isinstance(model, BM25Retriever):
        run = bm25_search(model, corpus, queries, k=k, max_doc_chars=max_doc_chars)
    else:
        run = dense_search(model, corpus, queries, instruction=instruction, k=k, batch_size=batch_size,
                           max_doc_chars=max_doc_chars, show_progress=show_progress, search=search,
                           chunk_size=chunk_size, store_dir=store_dir)
    res = evaluate_run(qrels, run)
    res.update({"num_queries": len(queries), "num_docs": len(corpus)})
    return res
