#!/usr/bin/env python
"""Benchmark memory of chunked top-k against the full score matrix it avoids (not a test).

Synthetic corpus of random unit vectors (default 200k x 384, float32), a block of queries, top-k with
``nvembed.mining.topk.chunked_topk``. Reports wall time, peak RSS of the process (``resource.getrusage``), the RSS
growth during the search, and the bytes a full ``queries x corpus`` float32 matrix would take (for the same queries
and for queries = corpus, the usual mining setting). ``--faiss`` also times FAISS IndexFlatIP and checks agreement.

    python scripts/bench_mining.py [--docs 200000] [--queries 2000] [--dim 384] [--k 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    # ru_maxrss is KiB on Linux: the peak resident set size so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--query-chunk-size", type=int, default=512)
    ap.add_argument("--doc-chunk-size", type=int, default=16384)
    ap.add_argument("--faiss", action="store_true")
    a = ap.parse_args(argv)

    import torch

    from nvembed.mining.topk import chunked_topk, faiss_topk

    rng = np.random.default_rng(0)
    docs = np.empty((a.docs, a.dim), dtype=np.float32)
    for c in range(0, a.docs, 16384):  # filled in blocks so generating the data does not set the RSS peak
        blk = rng.standard_normal((min(16384, a.docs - c), a.dim), dtype=np.float32)
        docs[c:c + len(blk)] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    queries = docs[rng.choice(a.docs, a.queries, replace=False)]
    queries += 0.1 * rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    base_peak, base_cur = rss_mb(), current_rss_mb()
    t = time.perf_counter()
    s, i = chunked_topk(queries, docs, a.k, query_chunk_size=a.query_chunk_size, doc_chunk_size=a.doc_chunk_size)
    dt = time.perf_counter() - t
    peak = rss_mb()
    out = {
        "docs": a.docs, "queries": a.queries, "dim": a.dim, "k": a.k, "torch_threads": torch.get_num_threads(),
        "chunked_seconds": round(dt, 2), "chunked_qps": round(a.queries / dt, 1),
        "rss_before_mb": round(base_cur, 1), "peak_rss_before_mb": round(base_peak, 1),
        "peak_rss_after_mb": round(peak, 1), "peak_rss_growth_mb": round(peak - base_peak, 1),
        "chunk_block_mb": round(a.query_chunk_size * (a.doc_chunk_size + 2 * a.k) * 4 / 2**20, 1),
        "full_matrix_mb_these_queries": round(a.queries * a.docs * 4 / 2**20, 1),
        "full_matrix_gb_queries_eq_corpus": round(a.docs * a.docs * 4 / 2**30, 1),
        "inputs_mb": round((docs.nbytes + queries.nbytes) / 2**20, 1),
    }
    if a.faiss:
        t = time.perf_counter()
        fs, fi = faiss_topk(queries, docs, a.k)
        out["faiss_seconds"] = round(time.perf_counter() - t, 2)
        out["faiss_top1_agreement"] = float(np.mean(fi[:, 0] == i[:, 0]))
        out["faiss_max_abs_score_diff"] = float(np.max(np.abs(fs - s)))
        out["peak_rss_after_faiss_mb"] = round(rss_mb(), 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
