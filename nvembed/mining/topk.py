"""Memory-bounded top-k search over normalised embeddings (inner product = cosine).

:func:`chunked_topk` never materialises the ``queries x corpus`` score matrix: it scores one
``query_chunk x doc_chunk`` block at a time and merges each block's ``torch.topk`` into a running top-k, so peak
extra memory is ``query_chunk * (doc_chunk + 2k) * 4`` bytes whatever the corpus size (sentence-transformers #3164:
a full 100k x 100k matrix took ~40 GB). :func:`faiss_topk` is the optional FAISS path (exact ``IndexFlatIP``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


@torch.no_grad()
def chunked_topk(queries, docs, k: int, *, query_chunk_size: int = 1024, doc_chunk_size: int = 16384,
                 show_progress: bool = False, device: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents per query by inner product.

    Args:
        queries: ``[nq, d]`` array/tensor (normalise first for cosine).
        docs: ``[nd, d]`` array/tensor (a ``np.memmap`` works: blocks are read lazily).
        k: results per query; clipped to ``nd``.
    Returns:
        ``(scores float32 [nq, k], indices int64 [nq, k])`` sorted by descending score per row.
    """
    nq, nd = len(queries), len(docs)
    k = min(int(k), nd)
    scores_out = np.empty((nq, k), dtype=np.float32)
    idx_out = np.empty((nq, k), dtype=np.int64)
    if k == 0 or nq == 0:
        return scores_out, idx_out
    dev = torch.device(device or "cpu")
    starts = range(0, nq, query_chunk_size)
    for qs in tqdm(starts, desc="top-k", disable=not show_progress, total=len(starts)):
        q = _as_tensor(queries[qs:qs + query_chunk_size]).to(dev)
        best_s = torch.full((len(q), 0), float("-inf"), device=dev)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
        for ds in range(0, nd, doc_chunk_size):
            d = _as_tensor(docs[ds:ds + doc_chunk_size]).to(dev)
            s = q @ d.T
            kk = min(k, s.shape[1])
            bs, bi = torch.topk(s, kk, dim=1)
            del s
            cat_s = torch.cat([best_s, bs], dim=1)
            cat_i = torch.cat([best_i, bi + ds], dim=1)
            kk = min(k, cat_s.shape[1])
            best_s, pos = torch.topk(cat_s, kk, dim=1)
            best_i = torch.gather(cat_i, 1, pos)
        scores_out[qs:qs + len(q)] = best_s.cpu().numpy()
        idx_out[qs:qs + len(q)] = best_i.cpu().numpy()
    return scores_out, idx_out


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401

        return True
    except ImportError:
        return False


def faiss_topk(queries, docs, k: int, *, add_chunk_size: int = 65536, query_chunk_size: int = 4096,
               show_progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` with FAISS ``IndexFlatIP`` on CPU (GPU FAISS gave slow/different results for users,
    FlagEmbedding #779). Vectors are re-normalised here (FAISS IP on unnormalised vectors is not cosine,
    sentence-transformers #2944). Missing results (``k > nd``) are trimmed, never returned as ``-1``."""
    import faiss

    def norm(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    nd = len(docs)
    k = min(int(k), nd)
    index = faiss.IndexFlatIP(int(np.asarray(docs[:1]).shape[1]))
    for ds in range(0, nd, add_chunk_size):
        index.add(norm(docs[ds:ds + add_chunk_size]))
    out_s = np.empty((len(queries), k), dtype=np.float32)
    out_i = np.empty((len(queries), k), dtype=np.int64)
    starts = range(0, len(queries), query_chunk_size)
    for qs in tqdm(starts, desc="faiss", disable=not show_progress, total=len(starts)):
        s, i = index.search(norm(queries[qs:qs + query_chunk_size]), k)
        out_s[qs:qs + len(s)], out_i[qs:qs + len(s)] = s, i
    return out_s, out_i


def search_topk(queries, docs, k: int, *, use_faiss: bool = False, **kw) -> Tuple[np.ndarray, np.ndarray]:
    """Dispatch to :func:`faiss_topk` (if requested) or :func:`chunked_topk`."""
    if use_faiss:
        if not faiss_available():
            raise ImportError("use_faiss=True needs faiss-cpu: pip install faiss-cpu")
        return faiss_topk(queries, docs, k, show_progress=kw.get("show_progress", False))
    return chunked_topk(queries, docs, k, **kw)
