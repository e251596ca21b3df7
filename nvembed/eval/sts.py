"""Semantic textual similarity: Spearman correlation between cosine similarity and gold scores (scipy)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy.stats import pearsonr, spearmanr


def load_sts(path, *, max_pairs: Optional[int] = None, seed: int = 0) -> Tuple[List[str], List[str], List[float]]:
    """Read a JSONL of ``{"sentence1", "sentence2", "score"}``; ``max_pairs`` takes a deterministic random subset."""
    rows = [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if max_pairs and len(rows) > max_pairs:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), max_pairs))]
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]


def evaluate_sts(encoder, sentences1, sentences2, gold_scores, *, instruction: Optional[str] = None,
                 batch_size: int = 32, show_progress: bool = False) -> Dict[str, float]:
    """STS is symmetric: both sides get the same ``instruction`` (NV-Embed puts STS instructions on both sides).
    Returns ``spearman`` (main score) and ``pearson`` of cosine similarity vs gold, as fractions in [-1, 1]."""
    s1, s2 = list(sentences1), list(sentences2)
    emb = encoder.encode(s1 + s2, instruction=instruction, batch_size=batch_size, show_progress=show_progress)
    a, b = emb[: len(s1)], emb[len(s1):]
    cos = np.sum(a * b, axis=1)
    gold = np.asarray(gold_scores, dtype=np.float64)
    return {"spearman": float(spearmanr(cos, gold).statistic), "pearson": float(pearsonr(cos, gold).statistic),
            "num_pairs": len(s1)}


def evaluate_sts_file(encoder, path, *, instruction: Optional[str] = None, max_pairs: Optional[int] = None,
                      seed: int = 0, batch_size: int = 32, show_progress: bool = False) -> Dict[str, float]:
    s1, s2, g = load_sts(path, max_pairs=max_pairs, seed=seed)
    return evaluate_sts(encoder, s1, s2, g, instruction=instruction, batch_size=batch_size,
                        show_progress=show_progress)
