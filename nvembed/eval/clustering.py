"""Clustering: (MiniBatch)KMeans on embeddings, V-measure against the gold labels (sklearn)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import v_measure_score

from nvembed.eval.classification import load_labeled


def cluster_v_measure(emb, labels, *, n_clusters: Optional[int] = None, n_runs: int = 1, seed: int = 0,
                      minibatch: Optional[bool] = None) -> Dict[str, float]:
    """V-measure of k-means clusters (k = number of gold labels unless given), averaged over ``n_runs`` seeds.
    ``minibatch=None`` uses MiniBatchKMeans above 10,000 points."""
    emb = np.asarray(emb, dtype=np.float32)
    k = n_clusters or len(set(labels))
    if minibatch is None:
        minibatch = len(emb) > 10000
    scores = []
    for r in range(n_runs):
        if minibatch:
            km = MiniBatchKMeans(n_clusters=k, random_state=seed + r, n_init=3, batch_size=2048)
        else:
            km = KMeans(n_clusters=k, random_state=seed + r, n_init=3)
        pred = km.fit_predict(emb)
        scores.append(v_measure_score(list(labels), pred))
    return {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}


def evaluate_clustering(encoder, texts, labels, *, instruction: Optional[str] = None, n_clusters=None,
                        n_runs: int = 1, seed: int = 0, batch_size: int = 32,
                        show_progress: bool = False) -> Dict[str, float]:
    emb = encoder.encode(list(texts), instruction=instruction, batch_size=batch_size, show_progress=show_progress)
    res = cluster_v_measure(emb, labels, n_clusters=n_clusters, n_runs=n_runs, seed=seed)
    res["num_texts"] = len(texts)
    return res


def evaluate_clustering_file(encoder, path, *, instruction: Optional[str] = None, max_items: Optional[int] = None,
                             max_chars: Optional[int] = None, n_runs: int = 1, seed: int = 0, batch_size: int = 32,
                             show_progress: bool = False) -> Dict[str, float]:
    texts, labels = load_labeled(path, max_items=max_items, seed=seed, max_chars=max_chars)
    return evaluate_clustering(encoder, texts, labels, instruction=instruction, n_runs=n_runs, seed=seed,
                               batch_size=batch_size, show_progress=show_progress)
