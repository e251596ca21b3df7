"""Hard-negative mining: positive-aware rules (NV-Retriever), chunked top-k, FAISS option, embedding cache."""

from nvembed.mining.cache import cache_key, encode_with_cache
from nvembed.mining.mine import mine_file, mine_hard_negatives, mined_spec, read_corpus, read_pairs, write_mined
from nvembed.mining.rules import DEFAULT_MARGINS, MiningRule, select_negatives
from nvembed.mining.topk import chunked_topk, faiss_available, faiss_topk, search_topk

__all__ = [
    "MiningRule", "DEFAULT_MARGINS", "select_negatives", "chunked_topk", "faiss_topk", "faiss_available",
    "search_topk", "cache_key", "encode_with_cache", "mine_hard_negatives", "mine_file", "read_pairs",
    "read_corpus", "write_mined", "mined_spec",
]
