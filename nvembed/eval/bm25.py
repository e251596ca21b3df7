"""BM25 with the corpus on disk: bm25s's scores, two streamed passes over the texts (issue #17).

bm25s (the former baseline) tokenizes and indexes the whole corpus at once. Here the texts are read ``chunk_size``
at a time (a :class:`~nvembed.eval.retrieval.DocTexts` reads them back from ``corpus.jsonl``) and tokenized by bm25s
itself (``bm25s.tokenize``: lowercase, ``\\b\\w\\w+\\b``, English stopwords), so the tokens are bm25s's:

* pass 1 (:func:`corpus_stats`): each token's document frequency (a dict: bounded by the vocabulary) and each
  document's length (one int32 a document);
* pass 2 (:func:`search`): per chunk, a sparse BM25 weight matrix of its documents restricted to the query terms,
  scores = queries x chunk (scipy.sparse), top-``k`` merged into a running top-``k`` per query.

Scores are bm25s's "lucene" BM25 to the float32 bit: idf = log(1 + (N - df + 0.5) / (df + 0.5)) rounded to float32,
weight = float32(idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))) computed in float64 as bm25s does, a query's score
summed in float32 token by token in the query's order, a repeated query token adding its weight once per occurrence.
Query tokens absent from the corpus are ignored; a query with none scores 0 everywhere (no results). Ties are broken
by corpus order (bm25s: argpartition's order), so documents tied at the k-th score may differ from bm25s's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

DEFAULT_CHUNK = 16384
SCORE_BLOCK = 1 << 20
"""Floats of one dense ``queries x chunk`` score block (4 MiB): sets how many queries are scored at once."""


@dataclass
class CorpusStats:
    """What pass 1 keeps of a corpus: enough to weight any query term in pass 2."""

    n_docs: int
    """Documents in the corpus (those without any token included, as bm25s counts them)."""
    lengths: np.ndarray
    """Tokens of each document after stopword removal (int32, corpus order)."""
    df: Dict[str, int]
    """Token -> number of documents holding it (every token of the corpus)."""


def _tokenize(texts: Sequence[str], stopwords) -> Tuple[Dict[str, int], np.ndarray, np.ndarray]:
    """bm25s's tokens of ``texts`` as (chunk vocabulary token -> id, tokens per text, flat token ids)."""
    import bm25s

    tok = bm25s.tokenize(list(texts), stopwords=stopwords, show_progress=False)
    lens = np.fromiter(map(len, tok.ids), dtype=np.int64, count=len(tok.ids))
    flat = np.fromiter(itertools.chain.from_iterable(tok.ids), dtype=np.int64, count=int(lens.sum()))
    return tok.vocab, lens, flat


def corpus_stats(texts: Sequence[str], *, stopwords="en", chunk_size: int = DEFAULT_CHUNK) -> CorpusStats:
    """Pass 1: document frequencies and lengths, ``chunk_size`` texts at a time (``texts[lo:hi]``)."""
    n = len(texts)
    lengths = np.zeros(n, dtype=np.int32)
    df: Dict[str, int] = {}
    for lo in range(0, n, chunk_size):
        vocab, lens, flat = _tokenize(texts[lo:lo + chunk_size], stopwords)
        lengths[lo:lo + len(lens)] = lens
        if not len(flat):
            continue
        doc = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        pairs = np.unique(doc * len(vocab) + flat)  # one (document, token) pair per document holding the token
        counts = np.bincount(pairs % len(vocab), minlength=len(vocab)).tolist()
        get = df.get
        for token, c in zip(vocab, counts):  # bm25s numbers a chunk's tokens 0.. in insertion order
            df[token] = get(token, 0) + c
    return CorpusStats(n, lengths, df)


def _query_matrix(queries: Sequence[str], stats: CorpusStats, stopwords):
    """Query tokens present in the corpus as a CSR matrix (queries x query terms, value 1 per occurrence: a repeated
    token is a repeated entry, kept in the query's order, which is how bm25s sums them), the terms and their idf.
    scipy does not merge the repeated entries of a matrix built from (data, indices, indptr) before a product."""
    import bm25s
    from scipy.sparse import csr_matrix

    toks = bm25s.tokenize(list(queries), stopwords=stopwords, show_progress=False, return_ids=False)
    cols: Dict[str, int] = {}
    indptr, indices = [0], []
    for q in toks:
        indices += [cols.setdefault(t, len(cols)) for t in q if t in stats.df]
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float32)
    n = stats.n_docs
    idf = np.array([np.float32(math.log(1 + (n - stats.df[t] + 0.5) / (stats.df[t] + 0.5))) for t in cols],
                   dtype=np.float64)  # bm25s keeps idf in float32, then multiplies in float64
    q = csr_matrix((data, np.asarray(indices, dtype=np.int64),
                    np.asarray(indptr, dtype=np.int64)), shape=(len(toks), len(cols)))
    return q, cols, idf


def _weights(texts: Sequence[str], lengths: np.ndarray, cols: Dict[str, int], idf: np.ndarray, avgdl: float,
             k1: float, b: float, stopwords):
    """Sparse BM25 weights (query terms x documents of this chunk), float32 as bm25s stores them."""
    from scipy.sparse import csr_matrix

    vocab, lens, flat = _tokenize(texts, stopwords)
    colmap = np.full(len(vocab) + 1, -1, dtype=np.int64)
    for t, c in cols.items():
        i = vocab.get(t)
        if i is not None:
            colmap[i] = c
    doc = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    col = colmap[flat]
    keep = col >= 0
    key, tf = np.unique(doc[keep] * len(cols) + col[keep], return_counts=True)
    d, c = key // len(cols), key % len(cols)
    tf = tf.astype(np.float64)
    dl = lengths[d].astype(np.float64)
    w = (idf[c] * (tf / (k1 * ((1 - b) + b * dl / avgdl) + tf))).astype(np.float32)
    return csr_matrix((w, (c, d)), shape=(len(cols), len(lens)), dtype=np.float32)


def _merge(best_s: np.ndarray, best_i: np.ndarray, r: np.ndarray, d: np.ndarray, s: np.ndarray) -> None:
    """Merge candidates (query row ``r``, document ``d``, score ``s``) into the running top-k in place: highest
    score first, ties to the lower document row."""
    k = best_s.shape[1]
    hr, hc = np.nonzero(best_i >= 0)
    r = np.concatenate([hr, r])
    d = np.concatenate([best_i[hr, hc], d])
    s = np.concatenate([best_s[hr, hc], s])
    o = np.lexsort((d, -s, r))
    r, d, s = r[o], d[o], s[o]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    keep = rank < k
    best_s.fill(-np.inf)
    best_i.fill(-1)
    best_s[r[keep], rank[keep]] = s[keep]
    best_i[r[keep], rank[keep]] = d[keep]


def search(texts: Sequence[str], stats: CorpusStats, queries: Sequence[str], *, k: int = 100, k1: float = 1.5,
           b: float = 0.75, stopwords="en", chunk_size: int = DEFAULT_CHUNK) -> Tuple[np.ndarray, np.ndarray]:
    """Pass 2: the top ``k`` documents of each query, ``(scores float32 [nq, k], rows int64 [nq, k])`` by
    descending score; a slot without a document of score > 0 holds row -1 (score -inf)."""
    q, cols, idf = _query_matrix(queries, stats, stopwords)
    k = max(0, min(int(k), stats.n_docs))
    best_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    best_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    if not cols or not k:
        return best_s, best_i
    avgdl = stats.lengths.mean()  # np.float64 as bm25s's, so the weights round the same way
    for lo in range(0, stats.n_docs, chunk_size):
        chunk = texts[lo:lo + chunk_size]
        w = _weights(chunk, stats.lengths[lo:lo + len(chunk)], cols, idf, avgdl, k1, b, stopwords)
        block = max(1, SCORE_BLOCK // max(1, len(chunk)))
        for q0 in range(0, q.shape[0], block):
            dense = (q[q0:q0 + block] @ w).toarray()  # csr @ csr sums each query's terms in its order, in float32
            kk = min(k, dense.shape[1])
            kth = -np.partition(-dense, kk - 1, axis=1)[:, kk - 1]
            r, c = np.nonzero((dense >= kth[:, None]) & (dense > 0))  # ties at the k-th score kept for _merge
            _merge(best_s[q0:q0 + block], best_i[q0:q0 + block], r, c + lo, dense[r, c])
    return best_s, best_i


def run_of(scores: np.ndarray, rows: np.ndarray, ids) -> List[Dict[str, float]]:
    """Per query ``{doc_id: score}`` of :func:`search`'s result; ``ids``: a list or a function rows -> ids (only
    the retrieved rows are named)."""
    found = np.unique(rows[rows >= 0])
    names = ids(found) if callable(ids) else [ids[int(i)] for i in found]
    name = dict(zip(found.tolist(), names))
    return [{name[int(j)]: float(s) for s, j in zip(srow, irow) if j >= 0} for srow, irow in zip(scores, rows)]
