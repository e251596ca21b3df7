"""Streamed BM25 (nvembed/eval/bm25.py) against bm25s itself over the whole corpus, the former baseline."""

import json

import numpy as np
import pytest

from nvembed.eval import BM25Retriever
from nvembed.eval.retrieval import evaluate_retrieval
from nvembed.eval.suite import load_suite, run_task
from nvembed.paths import specs_root


class Bm25sWhole(BM25Retriever):
    """The reference: bm25s tokenizes and indexes every text at once (the baseline before issue #17)."""

    def index(self, doc_ids, texts):
        import bm25s

        self._ids = doc_ids(range(len(texts))) if callable(doc_ids) else list(doc_ids)
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b)
        self._bm25.index(bm25s.tokenize(list(texts), stopwords=self.stopwords, show_progress=False),
                         show_progress=False)
        return self

    def search(self, queries, k=100):
        import bm25s

        tokens = bm25s.tokenize(list(queries), stopwords=self.stopwords, show_progress=False)
        docs, scores = self._bm25.retrieve(tokens, k=min(k, len(self._ids)), show_progress=False)
        self.run = [{self._ids[int(d)]: float(s) for d, s in zip(rd, rs) if s > 0} for rd, rs in zip(docs, scores)]
        return self.run


class Streamed(BM25Retriever):
    """The code under test, keeping its run."""

    def search(self, queries, k=100):
        self.run = super().search(queries, k)
        return self.run


def assert_same_run(ref, new, k):
    """Same documents and scores (1e-5), same ranking; documents tied at the k-th score may differ."""
    assert len(ref) == len(new)
    for r, n in zip(ref, new):
        assert len(n) == len(r)
        cut = min(r.values()) if len(r) == k else 0.0
        assert {d for d, s in r.items() if s > cut} == {d for d, s in n.items() if s > cut}
        assert all(abs(r[d] - n[d]) <= 1e-5 for d in r.keys() & n.keys())
        assert np.allclose(sorted(r.values()), sorted(n.values()), rtol=0, atol=1e-5)
        ranked = sorted(n, key=lambda d: -n[d])
        assert all(n[a] >= n[b] for a, b in zip(ranked, ranked[1:])) and list(n) == ranked


@pytest.mark.parametrize("chunk_size", [64, 16384])  # several chunks; the whole corpus in one
def test_demo_suite_same_as_bm25s(chunk_size):
    """Every retrieval task of the demo suite (the README's BM25 row): the same metrics and run as bm25s."""
    suite = load_suite(specs_root() + "/eval/demo.yaml")
    tasks = [t for t in suite["tasks"] if t["type"] == "retrieval"]
    assert len(tasks) >= 3
    for task in tasks:
        ref, new = Bm25sWhole(), Streamed(chunk_size=chunk_size)
        want = run_task(ref, task, suite["root"], seed=suite["seed"])
        got = run_task(new, task, suite["root"], seed=suite["seed"])
        assert want["num_docs"] > 2 * chunk_size if chunk_size == 64 else want["num_docs"] < chunk_size
        for m in ("ndcg@10", "recall@100", "mrr@10", "num_docs", "num_queries"):
            assert got[m] == want[m], (task["name"], m)
        assert_same_run(ref.run, new.run, task.get("k", 100))
        exact = sum(new.run[i][d] == s for i, r in enumerate(ref.run) for d, s in r.items() if d in new.run[i])
        assert exact > 0.99 * sum(map(len, ref.run)), task["name"]  # float32 sums in bm25s's order


def test_edge_cases_same_as_bm25s():
    """Documents without tokens (empty, stopwords only) count in N and the mean length; repeated query tokens;
    tokens absent from the corpus; a query with none; fewer matches than k; chunks of 2 documents."""
    texts = ["The cat sat on the mat", "", "the of and", "Cats and dogs; dogs and CATS!", "a mat, a hat",
             "dog dog dog house", "x y z", "hat-trick: cat, mat, hat"]
    ids = [f"d{i}" for i in range(len(texts))]
    queries = ["cat mat", "dog dog house", "unicorn", "the and", "hat unicorn hat cat", "CATS"]
    for k in (3, 100):
        ref = Bm25sWhole().index(ids, texts).search(queries, k)
        new = BM25Retriever(chunk_size=2).index(ids, texts).search(queries, k)
        assert new[2] == {} and new[3] == {}
        assert_same_run(ref, new, min(k, len(texts)))
    with pytest.raises(RuntimeError):
        BM25Retriever().search(["cat"])


def _write_beir(root, docs, queries, qrels):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r}\n" for r in qrels))
    return root


def heap_peak(tmp_path, n, model):
    """Traced peak of a BM25 evaluation over ``n`` documents of ~2,000 characters (vocabulary fixed)."""
    import tracemalloc

    rng = np.random.default_rng(n)
    words = np.array(["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"])
    docs = [{"_id": f"d{i}", "text": " ".join(rng.choice(words, 330))} for i in range(n)]
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(words, 4))} for i in range(20)]
    folder = _write_beir(tmp_path / str(n), docs, queries, [f"q{i}\td{(31 * i) % n}\t1" for i in range(20)])
    tracemalloc.start()
    try:
        res = evaluate_retrieval(model, folder, k=10)
        return tracemalloc.get_traced_memory()[1], res
    finally:
        tracemalloc.stop()


def test_heap_does_not_grow_with_the_corpus(tmp_path):
    """4x the documents: the Python heap grows by far less than the added text (bm25s held every text and token)."""
    n = 300
    small, res_small = heap_peak(tmp_path, n, BM25Retriever(chunk_size=64))
    big, res = heap_peak(tmp_path, 4 * n, BM25Retriever(chunk_size=64))
    assert res["num_docs"] == 4 * n and res_small["num_docs"] == n
    assert big - small < 0.1 * 3 * n * 2000, (small, big)
