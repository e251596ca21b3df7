"""Hard-negative mining: positive-aware rules (NV-Retriever), embeddings on disk (resumable, sharded over ranks),
streamed exact top-k or FAISS indexes (IVF, IVF-PQ, HNSW) with measured recall.

Names are imported on first use (PEP 562), so ``nvembed.mining.store`` / ``.index`` load without the data layer.
"""

import importlib

_WHERE = {
    "cache": ("cache_key", "encode_with_cache", "store_folder"),
    "index": ("SearchConfig", "SearchError", "build_index", "estimate_recall", "exact_topk", "recall_at_k", "search"),
    "mine": ("Ranks", "mine_file", "mine_hard_negatives", "mined_spec", "read_corpus", "read_pairs", "write_mined"),
    "rules": ("DEFAULT_MARGINS", "MiningRule", "select_negatives"),
    "store": ("EmbeddingStore", "StoreError", "encode_to_store"),
    "topk": ("chunked_topk", "faiss_available", "faiss_topk", "search_topk"),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"nvembed.mining.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'nvembed.mining' has no attribute {name!r}")
