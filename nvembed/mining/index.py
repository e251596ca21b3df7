"""Top-k search over an embedding store without the corpus matrix in RAM: streamed exact search or a FAISS index.

* ``exact``: :func:`exact_topk` reads the corpus one chunk at a time (``doc_chunk_size`` rows) and merges each
  chunk's top-k into a running top-k per query: memory ``queries x k`` plus one chunk, whatever the corpus size.
* ``flat``: FAISS ``IndexFlatIP`` (exact; the index holds the corpus in float32: small corpora only).
* ``ivf`` (IVF-Flat), ``ivfpq`` (IVF-PQ: ``pq_m`` bytes per vector, candidates re-scored exactly from the store),
  ``hnsw`` (HNSW-Flat): approximate. The index is trained on a sample and filled chunk by chunk from the store, so
  the process holds the index plus one chunk: IVF-PQ stays small for any dim, IVF-Flat/HNSW hold n x dim float32.

:func:`estimate_recall` measures what the approximate search loses: recall@k of its results against exact search on
a sample of queries (the fraction of the exact top-k that the index returned; a tie with the k-th score counts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from nvembed.errors import UserError

INDEX_KINDS = ("exact", "flat", "ivf", "ivfpq", "hnsw")


class SearchError(UserError):
    """A search setting that cannot work (unknown index, pq_m not dividing the dimension, faiss missing)."""

    kind = "search"


@dataclass
class SearchConfig:
    """How mining searches the corpus store (``scripts/mine_hard_negatives.py --index ...``)."""

    index: str = "exact"
    """exact (streamed, no index) | flat (FAISS exact, corpus in RAM) | ivf | ivfpq | hnsw (FAISS approximate)."""
    nlist: Optional[int] = None
    """IVF lists; None = sqrt(n), at most n / 39 (FAISS wants 39 training points per list). FAISS suggests up to
    16 * sqrt(n); training k-means costs train_size x nlist x dim, so the default stays at the low end for CPUs."""
    nprobe: int = 32
    """IVF lists visited per query: higher = better recall, slower."""
    pq_m: int = 32
    """IVF-PQ bytes per vector (sub-quantizers of 8 bits); must divide the embedding dimension."""
    refine_factor: int = 4
    """IVF-PQ: candidates fetched per query = refine_factor * k, re-scored exactly from the store."""
    hnsw_m: int = 32
    """HNSW neighbours per node (graph memory n * 2M * 4 bytes)."""
    ef_construction: int = 80
    """HNSW build beam width."""
    ef_search: int = 128
    """HNSW search beam width (raised to k if smaller)."""
    train_size: Optional[int] = None
    """Vectors sampled from the store to train IVF/PQ; None = min(n, max(64 * nlist, 20000), 262144)."""
    add_chunk_size: int = 65536
    """Rows read from the store per ``index.add`` (memory: one chunk in float32)."""
    doc_chunk_size: int = 65536
    """Exact search: corpus rows scored per step."""
    query_chunk_size: int = 1024
    """Exact search: queries per score block (block memory query_chunk x doc_chunk x 4 bytes)."""
    recall_sample: int = 1000
    """Approximate indexes: queries sampled to measure recall@k against exact search (0 = skip)."""
    seed: int = 0
    """Sampling of training vectors and recall queries."""

    def __post_init__(self):
        if self.index not in INDEX_KINDS:
            raise SearchError(f"index={self.index!r}: choose one of {', '.join(INDEX_KINDS)}")
        for k in ("nprobe", "pq_m", "refine_factor", "hnsw_m", "ef_construction", "ef_search", "add_chunk_size",
                  "doc_chunk_size", "query_chunk_size"):
            if int(getattr(self, k)) < 1:
                raise SearchError(f"{k}={getattr(self, k)}: must be >= 1")
        if self.nlist is not None and self.nlist < 1:
            raise SearchError(f"nlist={self.nlist}: must be >= 1")

    @property
    def approximate(self) -> bool:
        return self.index in ("ivf", "ivfpq", "hnsw")

    def to_dict(self) -> Dict:
        """The settings that change results (recorded in the mined spec's provenance)."""
        keep = {"exact": (), "flat": (), "ivf": ("nlist", "nprobe"),
                "ivfpq": ("nlist", "nprobe", "pq_m", "refine_factor"),
                "hnsw": ("hnsw_m", "ef_construction", "ef_search")}[self.index]
        return {"index": self.index, **{k: v for k, v in asdict(self).items() if k in keep}}


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


@torch.no_grad()
def exact_topk(queries, docs, k: int, *, doc_chunk_size: int = 65536,
               query_chunk_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products, reading ``docs`` (an :class:`EmbeddingStore` or array) once, chunk by chunk.
    Returns ``(scores float32 [nq, k], ids int64 [nq, k])``, best first; ``k`` clipped to ``len(docs)``."""
    q = torch.from_numpy(_f32(queries))
    nq, nd = len(q), len(docs)
    k = min(int(k), nd)
    best_s = torch.full((nq, 0), float("-inf"))
    best_i = torch.zeros((nq, 0), dtype=torch.long)
    for ds in range(0, nd if k else 0, doc_chunk_size):
        d = torch.from_numpy(_f32(docs[ds:ds + doc_chunk_size]))
        new_s, new_i = [], []
        for qs in range(0, nq, query_chunk_size):
            s = q[qs:qs + query_chunk_size] @ d.T
            bs, bi = torch.topk(s, min(k, s.shape[1]), dim=1)
            cat_s = torch.cat([best_s[qs:qs + query_chunk_size], bs], dim=1)
            cat_i = torch.cat([best_i[qs:qs + query_chunk_size], bi + ds], dim=1)
            top_s, pos = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
            new_s.append(top_s)
            new_i.append(torch.gather(cat_i, 1, pos))
        best_s, best_i = torch.cat(new_s), torch.cat(new_i)
    return best_s.numpy().astype(np.float32), best_i.numpy().astype(np.int64)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("this index needs faiss-cpu: pip install faiss-cpu (or use --index exact)") from None
    return faiss


def _sample_rows(docs, n: int, seed: int) -> np.ndarray:
    ids = np.sort(np.random.default_rng(seed).choice(len(docs), size=n, replace=False))
    return _f32(docs.take(ids) if hasattr(docs, "take") and not isinstance(docs, np.ndarray) else docs[ids])


def default_nlist(n: int) -> int:
    return max(1, min(int(math.sqrt(n)), n // 39))


def build_index(docs, cfg: SearchConfig):
    """A FAISS index over ``docs`` (store or array), trained on a sample and filled ``add_chunk_size`` rows at a
    time; None for ``exact`` (nothing to build)."""
    if cfg.index == "exact":
        return None
    faiss = _faiss()
    n, dim = len(docs), int(docs.shape[1])
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.index == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        nlist = min(cfg.nlist or default_nlist(n), n)
        quantizer = faiss.IndexFlatIP(dim)
        if cfg.index == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        else:
            if dim % cfg.pq_m:
                raise SearchError(f"pq_m={cfg.pq_m} must divide the embedding dimension {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, ip)
        size = cfg.train_size or min(n, max(64 * nlist, 20000), 262144)
        index.train(_sample_rows(docs, min(n, max(size, nlist)), cfg.seed))
        index.nprobe = min(cfg.nprobe, nlist)
    for ds in range(0, n, cfg.add_chunk_size):
        index.add(_f32(docs[ds:ds + cfg.add_chunk_size]))
    return index


def index_search(index, queries, k: int, cfg: SearchConfig, docs=None) -> Tuple[np.ndarray, np.ndarray]:
    """Search a built index. Missing results (an IVF probe with fewer than ``k`` vectors) get id -1 and score
    -inf, at the end of the row; IVF-PQ candidates are re-scored exactly from ``docs``."""
    queries = _f32(queries)
    n = index.ntotal
    k = min(int(k), n)
    if cfg.index == "hnsw":
        index.hnsw.efSearch = max(cfg.ef_search, k)
    kk = min(n, k * cfg.refine_factor) if cfg.index == "ivfpq" else k
    s, i = index.search(queries, kk)
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    if cfg.index == "ivfpq" and docs is not None:
        step = max(1, 2**24 // max(1, kk * queries.shape[1]))  # candidate rows re-read per step: <= 64 MB
        for qs in range(0, len(queries), step):
            ii, valid = i[qs:qs + step], i[qs:qs + step] >= 0
            rows = docs.take(ii[valid]) if not isinstance(docs, np.ndarray) else _f32(docs[ii[valid]])
            qrow = qs + np.repeat(np.arange(len(ii)), valid.sum(1))
            s[qs:qs + step][valid] = np.einsum("nd,nd->n", rows, queries[qrow])
        order = np.argsort(-s, axis=1, kind="stable")
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return s[:, :k], i[:, :k]


def search(queries, docs, k: int, cfg: SearchConfig, index=None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` in ``docs`` the way ``cfg`` says (``index`` = from :func:`build_index`)."""
    if cfg.index == "exact":
        return exact_topk(queries, docs, k, doc_chunk_size=cfg.doc_chunk_size,
                          query_chunk_size=cfg.query_chunk_size)
    return index_search(index, queries, k, cfg, docs)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: Optional[int] = None, approx_scores=None,
                exact_scores=None, tol: float = 1e-6) -> float:
    """Mean over queries of the fraction of the exact top-k that the approximate top-k holds. With scores, a result
    scoring at least the exact k-th score (within ``tol``) also counts: among tied documents (duplicates) either
    one is a correct answer."""
    k = k or exact_ids.shape[1]
    hits = []
    for j, (a, e) in enumerate(zip(approx_ids, exact_ids)):
        a, e = a[:k], e[:k]
        found = np.isin(a, e) & (a >= 0)
        if approx_scores is not None and len(e):
            found |= (a >= 0) & (approx_scores[j][:k] >= exact_scores[j][len(e) - 1] - tol)
        hits.append(min(int(found.sum()), len(e)) / max(1, len(e)))
    return float(np.mean(hits)) if hits else float("nan")


def estimate_recall(index, queries, docs, k: int, cfg: SearchConfig) -> Dict[str, float]:
    """recall@k (and @10, @1 when smaller) of the index against exact search, on up to ``cfg.recall_sample`` queries
    sampled from ``queries`` (store or array)."""
    n = min(cfg.recall_sample, len(queries))
    if not cfg.approximate or n == 0:
        return {}
    ids = np.sort(np.random.default_rng(cfg.seed + 1).choice(len(queries), size=n, replace=False))
    q = _f32(queries.take(ids) if not isinstance(queries, np.ndarray) else queries[ids])
    es, ex = exact_topk(q, docs, k, doc_chunk_size=cfg.doc_chunk_size, query_chunk_size=cfg.query_chunk_size)
    as_, ap = index_search(index, q, k, cfg, docs)
    out = {"recall_sample": n}
    for kk in (ex.shape[1], 10, 1):
        if kk <= ex.shape[1] and f"recall@{kk}" not in out:
            out[f"recall@{kk}"] = round(recall_at_k(ap, ex, kk, as_, es), 4)
    return out
