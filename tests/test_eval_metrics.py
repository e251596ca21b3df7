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


# ------------------------------------------------------------------------------------------------ corpus on disk
# (issue #17) evaluation streams the corpus: offsets + id digests in numpy, embeddings in a store on disk

import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from nvembed.eval.retrieval import _natural, doc_text, evaluate_retrieval, load_beir, open_beir  # noqa: E402
from nvembed.mining.index import SearchConfig  # noqa: E402
from nvembed.mining.topk import chunked_topk  # noqa: E402

EVAL = Path(__file__).resolve().parents[1] / "data_specs" / "eval"


class WordHashEncoder:
    """Bag of words: each word a fixed random vector (seeded by its crc32), summed and normalised. Deterministic per
    text whatever the batch, and lexical enough for non-trivial nDCG on the BEIR folders."""

    name = "wordhash"

    def __init__(self, dim=48):
        self.dim, self.vec, self.done, self.calls = dim, {}, {}, 0

    def _v(self, w):
        if w not in self.vec:
            self.vec[w] = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(self.dim)
        return self.vec[w]

    def _text(self, t):
        if t not in self.done:  # the in-RAM reference encodes the same texts again: computed once
            v = sum((self._v(w) for w in re.findall(r"[a-z]{3,}", t.lower())), np.eye(1, self.dim)[0] * 1e-3)
            self.done[t] = (v / np.linalg.norm(v)).astype(np.float32)
        return self.done[t]

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        self.calls += 1
        return np.stack([self._text(t) for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)


def _old_subset(corpus, queries, qrels, max_queries, max_corpus, max_judged_docs, seed):
    """subset_beir as it was before the corpus moved to disk (dicts only), kept here as the reference."""
    rng = random.Random(seed)
    qids = sorted(queries, key=_natural)
    if max_judged_docs:
        order = list(qids)
        rng.shuffle(order)
        picked, judged = [], set()
        for q in order:
            rel = {d for d, s in qrels[q].items() if s > 0 and d in corpus}
            if len(judged | rel) <= max_judged_docs:
                picked.append(q)
                judged |= rel
            if max_queries and len(picked) >= max_queries:
                break
        qids = sorted(picked, key=_natural)
    elif max_queries and len(qids) > max_queries:
        qids = sorted(rng.sample(qids, max_queries), key=_natural)
    queries, qrels = {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}
    if max_corpus and len(corpus) > max_corpus:
        keep = {d for docs in qrels.values() for d, s in docs.items() if s > 0 and d in corpus}
        others = sorted((d for d in corpus if d not in keep), key=_natural)
        keep |= set(rng.sample(others, min(max(0, max_corpus - len(keep)), len(others))))
        corpus = {d: corpus[d] for d in sorted(keep, key=_natural)}
    return corpus, queries, qrels


def _old_evaluate(enc, folder, instruction=None, max_queries=None, max_corpus=None, max_judged_docs=None,
                  max_doc_chars=None, max_query_chars=None, seed=0, k=100):
    """The in-RAM evaluation before issue #17: every document text and the whole corpus matrix in memory."""
    corpus, queries, qrels = _old_subset(*load_beir(folder), max_queries, max_corpus, max_judged_docs, seed)
    if max_query_chars:
        queries = {q: t[:max_query_chars] for q, t in queries.items()}
    ids, qids = list(corpus), list(queries)
    d = enc.encode([doc_text(corpus[i], max_doc_chars) for i in ids])
    s, idx = chunked_topk(enc.encode([queries[q] for q in qids], instruction=instruction), d, k)
    res = evaluate_run(qrels, {q: {ids[j]: float(x) for x, j in zip(s[i], idx[i])} for i, q in enumerate(qids)})
    return {**res, "num_queries": len(queries), "num_docs": len(corpus)}


def test_streamed_evaluation_equals_in_ram_on_the_repo_suites(tmp_path):
    """Every retrieval task of the demo and full suites (subsets and all) gives the numbers of the in-RAM path, with
    the corpus encoded in several chunks; nothing is left in the store folder."""
    tasks = []
    for suite in ("demo.yaml", "full.yaml"):
        spec = yaml.safe_load((EVAL / suite).read_text())
        tasks += [(t, spec.get("seed", 0)) for t in spec["tasks"] if t["type"] == "retrieval"]
    assert len(tasks) >= 6
    knobs = ("max_queries", "max_corpus", "max_judged_docs", "max_doc_chars", "max_query_chars")
    enc = WordHashEncoder()
    for t, seed in tasks:
        kw = {key: t.get(key) for key in knobs}
        new = evaluate_retrieval(enc, EVAL / t["path"], instruction=t.get("instruction"), seed=seed,
                                 chunk_size=97, store_dir=tmp_path, **kw)
        old = _old_evaluate(enc, EVAL / t["path"], t.get("instruction"), seed=seed, **kw)
        assert new == old, t["name"]
        assert new["ndcg@10"] > 0.05, (t["name"], new)  # lexical: far above random
    assert not any(tmp_path.iterdir())


def _write_beir(root, docs, queries, qrels):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r}\n" for r in qrels))
    return root


def test_corpus_on_disk_ids_subsets_and_repeats(tmp_path):
    """Ids of every kind (numbers with leading zeros, text, non-ASCII, a repeated id: its last line wins at its
    first place), subsets picked as by the dict code, FAISS search as an option."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta", "lambda", "zeta"]
    ids = [str(i) for i in range(60)] + ["007", "00", "b2", "a10", "a9", "Zed", "é1", "ü", "12a", "١٢"]
    docs = [{"_id": d, "title": f"t{i}" if i % 3 else "", "text": " ".join(rng.choice(words, 6))}
            for i, d in enumerate(ids)]
    docs.insert(5, {"_id": "b2", "text": "an earlier line with the same id"})
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(words, 3))} for i in range(25)]
    qrels = [f"q{i}\t{ids[(7 * i) % len(ids)]}\t{1 + i % 2}" for i in range(25)] + ["q3\t12a\t0"]
    folder = _write_beir(tmp_path / "beir", docs, queries, qrels)
    beir = open_beir(folder)
    as_dict = load_beir(folder)[0]
    ref = {}
    for d in docs:  # what a dict filled line by line holds: "b2" at its first place, with its last line
        ref[d["_id"]] = {"title": d.get("title", ""), "text": d["text"]}
    assert as_dict == ref and list(as_dict) == list(ref) == beir.corpus.ids(range(len(ids)))
    assert as_dict["b2"]["text"] != "an earlier line with the same id"
    assert "007" in beir.corpus and "7" in beir.corpus and "nope" not in beir.corpus
    names = list(ref)
    assert [names[i] for i in beir.corpus.natural_order()] == sorted(names, key=_natural)
    for kw in (dict(max_queries=10, max_corpus=30, seed=3), dict(max_corpus=40, max_judged_docs=12, seed=1),
               dict(max_queries=5, max_corpus=len(ids) + 5)):
        corpus, q, r = subset_beir(beir.corpus, beir.queries, beir.qrels, **kw)
        old = _old_subset(as_dict, beir.queries, beir.qrels, kw.get("max_queries"), kw.get("max_corpus"),
                          kw.get("max_judged_docs"), kw["seed"] if "seed" in kw else 0)
        got = corpus.ids(range(len(corpus)))
        # the same documents in the same order; ids of equal value ("0", "00") were in set order (it varied from
        # one process to the next), now in file order
        assert set(got) == set(old[0]) and [_natural(d) for d in got] == [_natural(d) for d in old[0]], kw
        assert (q, r) == old[1:], kw
        assert corpus.texts()[:] == [doc_text(as_dict[d]) for d in got]
    exact = evaluate_retrieval(WordHashEncoder(), folder, k=10, chunk_size=16)
    assert exact == _old_evaluate(WordHashEncoder(), folder, k=10)
    flat = evaluate_retrieval(WordHashEncoder(), folder, k=10, chunk_size=16, search=SearchConfig(index="flat"))
    assert flat == pytest.approx(exact, abs=1e-6)


class TextSeeded:
    """Each text -> a random unit vector seeded by its crc32 (cheap: one vector per text); counts calls."""

    name = "seeded"

    def __init__(self):
        self.calls = 0

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        self.calls += 1
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_evaluation_keeps_the_corpus_on_disk(tmp_path):
    """4x the documents of 2,000 characters: the Python heap grows by the offsets, digests and one chunk, not by the
    texts (before issue #17 evaluation held every text and the whole embedding matrix)."""
    import tracemalloc

    def peak(n):
        root = tmp_path / str(n)
        rng = np.random.default_rng(n)
        words = np.array(["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"])
        docs = [{"_id": f"d{i}", "text": " ".join(rng.choice(words, 330))} for i in range(n)]
        queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(words, 4))} for i in range(20)]
        folder = _write_beir(root, docs, queries, [f"q{i}\td{(31 * i) % n}\t1" for i in range(20)])
        enc = TextSeeded()
        tracemalloc.start()
        try:
            res = evaluate_retrieval(enc, folder, k=10, chunk_size=64, store_dir=root)
            return tracemalloc.get_traced_memory()[1], res, enc.calls
        finally:
            tracemalloc.stop()

    n = 300
    small, _, _ = peak(n)
    big, res, calls = peak(4 * n)
    assert res["num_docs"] == 4 * n and calls == 4 * n // 64 + 1 + 1  # corpus chunks + the queries
    assert big - small < 0.1 * 3 * n * 2000, (small, big)
