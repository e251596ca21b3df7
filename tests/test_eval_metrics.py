"""Retrieval/STS/classification/clustering metrics against hand-computed values."""

import math

import numpy as np
import pytest

from nvembed.eval.clustering import cluster_v_measure
from nvembed.eval.classification import linear_probe
from nvembed.eval.retrieval import evaluate_run, subset_beir
from nvembed.eval.sts import evaluate_sts


def test_retrieval_metrics_hand_computed():
    qrels = {
        "q1": {"d1": 1, "d2": 1, "d6": 1},  # binary, d6 never retrieved
        "q2": {"d3": 2, "d4": 1},  # graded
        "q3": {"d5": 1},  # relevant doc at rank 11
    }
    run = {
        "q1": {"d1": 0.9, "dx": 0.8, "d2": 0.7},
        "q2": {"dy": 0.9, "d4": 0.8, "d3": 0.7},
        "q3": {**{f"n{i}": 1.0 - 0.01 * i for i in range(10)}, "d5": 0.5},
    }
    # q1: rel at ranks 1 and 3; ideal has 3 rel docs.
    ndcg1 = (1 / math.log2(2) + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    # q2: gains are the graded scores (trec_eval, linear): gain 1 at rank 2, gain 2 at rank 3; ideal 2 then 1.
    ndcg2 = (1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
    ndcg3 = 0.0  # relevant at rank 11 > 10
    recall = (2 / 3 + 1 + 1) / 3
    mrr = (1 + 1 / 2 + 0) / 3  # q3's first relevant is past rank 10
    m = evaluate_run(qrels, run)
    assert m["ndcg@10"] == pytest.approx((ndcg1 + ndcg2 + ndcg3) / 3, abs=1e-4)
    assert m["recall@100"] == pytest.approx(recall, abs=1e-6)
    assert m["mrr@10"] == pytest.approx(mrr, abs=1e-6)


def test_missing_query_counts_as_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    m = evaluate_run(qrels, {"q1": {"d1": 1.0}})
    assert m["ndcg@10"] == pytest.approx(0.5) and m["mrr@10"] == pytest.approx(0.5)


def test_subset_keeps_judged_docs():
    corpus = {str(i): {"title": "", "text": f"doc {i}"} for i in range(100)}
    queries = {str(i): f"q {i}" for i in range(20)}
    qrels = {str(i): {str(i * 3): 1, str(i * 3 + 1): 1} for i in range(20)}
    c, q, r = subset_beir(corpus, queries, qrels, max_queries=5, max_corpus=30, seed=1)
    assert len(q) == 5 and len(c) == 30
    assert all(d in c for docs in r.values() for d in docs)
    assert subset_beir(corpus, queries, qrels, max_queries=5, max_corpus=30, seed=1)[0].keys() == c.keys()
    c2, q2, _ = subset_beir(corpus, queries, qrels, max_queries=10, max_corpus=30, max_judged_docs=6, seed=0)
    assert len(q2) == 3 and len(c2) == 30


class _Fixed:
    name = "fixed"

    def __init__(self, table):
        self.table = table

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        x = np.array([self.table[t] for t in texts], dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sts_spearman():
    ang = {"a": 0.0, "b": 0.1, "c": 0.5, "d": 1.0, "e": 1.5}
    enc = _Fixed({k: [math.cos(v), math.sin(v)] for k, v in ang.items()})
    # cosines: a-b 0.995, a-c 0.878, a-d 0.540, a-e 0.071 -> gold in the same order gives rho = 1
    res = evaluate_sts(enc, ["a", "a", "a", "a"], ["b", "c", "d", "e"], [5, 4, 2, 0])
    assert res["spearman"] == pytest.approx(1.0)
    res = evaluate_sts(enc, ["a", "a", "a", "a"], ["b", "c", "d", "e"], [0, 2, 4, 5])
    assert res["spearman"] == pytest.approx(-1.0)


def test_linear_probe_and_clustering_separable():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8) * 5
    x = np.concatenate([c + rng.standard_normal((40, 8)) * 0.3 for c in centers])
    y = np.repeat(["a", "b", "c"], 40)
    idx = rng.permutation(len(x))
    tr, te = idx[:60], idx[60:]
    assert linear_probe(x[tr], y[tr], x[te], y[te])["accuracy"] == 1.0
    assert cluster_v_measure(x, y)["v_measure"] == pytest.approx(1.0)
