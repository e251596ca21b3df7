"""Chunked top-k, FAISS path, embedding cache resume, end-to-end mining and the CLI."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from nvembed.data import build_stage_data
from nvembed.data.spec import load_spec
from nvembed.mining import MiningRule, chunked_topk, encode_with_cache, faiss_available, mine_hard_negatives
from nvembed.mining.topk import faiss_topk

REPO = Path(__file__).resolve().parents[1]


class HashEncoder:
    """Deterministic bag-of-words hashing encoder (texts sharing words are similar); counts encoded texts."""

    name = "hash-bow"

    def __init__(self, dim=64, fail_after=None):
        self.dim, self.count, self.calls, self.fail_after = dim, 0, 0, fail_after

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.count += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                h = int(hashlib.md5(w.encode()).hexdigest(), 16)
                out[i, h % self.dim] += 1.0 if (h >> 8) % 2 else -1.0
            out[i, -1] += 0.01
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_chunked_topk_equals_full():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((37, 16)).astype(np.float32)
    d = rng.standard_normal((1003, 16)).astype(np.float32)
    full = q @ d.T
    ref_i = np.argsort(-full, axis=1, kind="stable")[:, :25]
    s, i = chunked_topk(q, d, 25, query_chunk_size=8, doc_chunk_size=100)
    assert s.shape == (37, 25) and i.dtype == np.int64
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, np.take_along_axis(full, ref_i, 1), rtol=1e-5, atol=1e-5)
    # k larger than a doc chunk and larger than the corpus
    s2, i2 = chunked_topk(q, d[:30], 50, doc_chunk_size=7)
    assert i2.shape == (37, 30)
    np.testing.assert_array_equal(i2, np.argsort(-(q @ d[:30].T), axis=1, kind="stable"))


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_matches_chunked():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((500, 16)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = d[:20] + 0.05 * rng.standard_normal((20, 16)).astype(np.float32)
    s1, i1 = chunked_topk(q / np.linalg.norm(q, axis=1, keepdims=True), d, 10)
    s2, i2 = faiss_topk(q, d, 10)  # faiss_topk normalises itself
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert faiss_topk(q, d[:5], 10)[1].shape == (20, 5)  # never pads with -1


def test_embedding_cache_resume(tmp_path):
    texts = [f"text number {i}" for i in range(10)]
    ref = HashEncoder().encode(texts)
    crashing = HashEncoder(fail_after=2)
    with pytest.raises(RuntimeError):
        encode_with_cache(crashing, texts, cache_dir=tmp_path, chunk_size=3)
    assert crashing.count == 6  # two chunks done and saved
    enc = HashEncoder()
    out = encode_with_cache(enc, texts, cache_dir=tmp_path, chunk_size=3)
    assert enc.count == 4  # resumed: only chunks 3 and 4 were encoded
    np.testing.assert_allclose(out, ref, atol=1e-6)
    enc2 = HashEncoder()
    np.testing.assert_allclose(encode_with_cache(enc2, texts, cache_dir=tmp_path, chunk_size=3), ref, atol=1e-6)
    assert enc2.count == 0  # fully cached
    enc3 = HashEncoder()
    encode_with_cache(enc3, texts, instruction="other", cache_dir=tmp_path, chunk_size=3)
    assert enc3.count == 10  # different key
    assert not list(Path(tmp_path).rglob("*.tmp.npy"))


def test_store_key_is_computed_from_text_digests(tmp_path):
    """The cache key hashes each text's 16-byte digest (the miner holds them: naming a store reads no text back):
    the same key from the texts or from their digests as the file scan keeps them; any change gives another key."""
    from nvembed.mining import cache_key, store_folder
    from nvembed.mining.texts import from_files

    docs = [f"document {i}" for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "positive": docs[i]}) + "\n"
                                                  for i in range(3)))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"c{i}", "text": t}) + "\n"
                                                   for i, t in enumerate(docs)))
    texts = from_files(tmp_path / "pairs.jsonl", tmp_path / "corpus.jsonl")
    try:
        assert list(texts.docs) == docs  # positives are corpus documents: nothing added
        enc = HashEncoder()
        assert store_folder(tmp_path, enc, None, hashes=texts.doc_hash) == store_folder(tmp_path, enc, docs)
        assert store_folder(tmp_path, enc, None, "ins", hashes=texts.query_hash) == \
            store_folder(tmp_path, enc, ["q0", "q1", "q2"], "ins")
    finally:
        texts.close()
    key = cache_key("m", docs, "ins")
    others = {cache_key("m", docs[:-1] + ["document 50"], "ins"), cache_key("m", docs[::-1], "ins"),
              cache_key("m", docs, None), cache_key("m", docs, "ins", "float16"), cache_key("n", docs, "ins")}
    assert key not in others and len(others) == 5


def _toy():
    topics = ["apple banana fruit", "car engine wheel", "river lake water", "guitar piano music", "cat dog pet"]
    corpus = [f"{t} doc {j}" for t in topics for j in range(8)]
    queries = [f"{t} question" for t in topics]
    positives = [[f"{t} doc 0", f"{t} doc 1"] for t in topics]
    return queries, positives, corpus


@pytest.mark.parametrize("use_faiss", [False, True])
def test_mine_end_to_end(tmp_path, use_faiss):
    if use_faiss and not faiss_available():
        pytest.skip("faiss-cpu not installed")
    queries, positives, corpus = _toy()
    corpus = corpus + [positives[0][0]]  # duplicate of a positive in the corpus: must never become a negative
    rule = MiningRule(rule="topk", range_min=0, range_max=10, num_negatives=3)
    stats = {}
    recs = mine_hard_negatives(HashEncoder(), queries, positives, corpus, rule=rule, cache_dir=tmp_path / "c",
                               use_faiss=use_faiss, query_block_size=2, doc_chunk_size=7, show_progress=False,
                               stats=stats)
    assert stats["corpus_size"] == 40 and len(recs) == 5
    for r, q, ps in zip(recs, queries, positives):
        assert r["query"] == q and r["positives"] == ps and len(r["negatives"]) == 3
        assert not set(r["negatives"]) & set(ps)
        assert r["negative_scores"] == sorted(r["negative_scores"], reverse=True)
        assert len(r["positive_scores"]) == 2
        topic = q.rsplit(" ", 1)[0]
        assert all(n.startswith(topic) for n in r["negatives"])  # hardest = same topic, non-positive docs
    # percpos drops candidates scoring close to the weakest positive
    recs2 = mine_hard_negatives(HashEncoder(), queries, positives, corpus, rule=MiningRule(num_negatives=3),
                                use_faiss=use_faiss, show_progress=False)
    for r in recs2:
        assert all(s <= 0.95 * min(r["positive_scores"]) + 1e-6 for s in r["negative_scores"])


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli_inputs(tmp_path, monkeypatch):
    queries, positives, corpus = _toy()
    inp = tmp_path / "pairs.jsonl"
    with open(inp, "w") as f:
        for q, ps in zip(queries, positives):
            for p in ps:  # one row per pair: rows with the same query are merged
                f.write(json.dumps({"query": q, "positive": p, "instruction": "x"}) + "\n")
    corp = tmp_path / "corpus.jsonl"
    corp.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(corpus)))
    import nvembed.eval.encoders as enc_mod

    monkeypatch.setattr(enc_mod, "load_encoder", lambda *a, **k: HashEncoder())  # the teacher is not under test
    return inp, corp, _load_script("mine_hard_negatives")


def test_mining_cli(tmp_path, capsys, monkeypatch):
    inp, corp, mod = _cli_inputs(tmp_path, monkeypatch)
    out = tmp_path / "mined" / "train.jsonl"
    assert mod.main(["--teacher", "dummy", "--input", str(inp), "--corpus", str(corp), "--out", str(out),
                     "--rule", "topk_abs", "--margin", "0.99", "--range", "0", "20", "--num-negatives", "2",
                     "--cache", str(tmp_path / "cache")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["num_queries"] == 5
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["positives"]) == 2 and len(r["negatives"]) == 2 for r in rows)
    assert set(rows[0]) >= {"query", "positives", "negatives", "negative_scores", "positive_scores", "instruction"}
    # the spec is the trainer's schema, loads as written, and the data layer reads the rows with teacher scores
    spec_path = out.with_suffix(".yaml")
    spec = load_spec(spec_path)
    assert yaml.safe_load(spec_path.read_text()) == spec.to_dict()
    assert spec.name == "train" and spec.source.path == "train.jsonl" and spec.task == "retrieval"
    assert spec.instruction == "Given a query, retrieve relevant documents"  # no --instruction: the default
    assert spec.provenance["rule"] == "topk_abs" and spec.provenance["margin"] == 0.99
    assert spec.provenance["num_queries"] == 5 and spec.provenance["corpus"] == str(corp)
    data = build_stage_data([str(spec_path)], num_hard_negatives=2, batch_size=5, log=lambda *_: None)
    by_query = {r["query"]: r for r in rows}
    for ex in data.batch(0):
        row = by_query[ex.query]
        assert ex.positive in row["positives"] and ex.negatives == row["negatives"]
        assert ex.teacher_scores == [row["positive_scores"][row["positives"].index(ex.positive)],
                                     *row["negative_scores"]]


def test_mining_cli_errors_keep_earlier_output(tmp_path, capsys, monkeypatch):
    inp, corp, mod = _cli_inputs(tmp_path, monkeypatch)
    out = tmp_path / "train.jsonl"
    args = ["--teacher", "dummy", "--input", str(inp), "--corpus", str(corp), "--out", str(out)]
    assert mod.main(args + ["--instruction", "Find documents", "--spec", str(tmp_path / "s.yaml")]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    # a spec that would not load, and a malformed input line: one-line errors, exit 2, nothing written
    with pytest.raises(SystemExit) as e:
        mod.main(args + ["--name", " ", "--spec", str(tmp_path / "s.yaml")])
    assert e.value.code == 2 and "s.yaml: 'name' is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(inp.read_text() + "{not json\n")
    before[bad.name] = bad.read_bytes()
    with pytest.raises(SystemExit) as e:
        mod.main(["--teacher", "dummy", "--input", str(bad), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("nvembed: data error: ") and "bad.jsonl:11: malformed JSON" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_mining_cli_approximate_index_reports_recall(tmp_path, capsys, monkeypatch):
    """--index hnsw --fp16 through the CLI: recall vs exact printed, index settings in the spec, the same negatives
    as exact search on this small corpus (HNSW finds every neighbour of 41 points)."""
    inp, corp, mod = _cli_inputs(tmp_path, monkeypatch)
    base = ["--teacher", "dummy", "--input", str(inp), "--corpus", str(corp), "--range", "0", "10", "--rule", "topk",
            "--num-negatives", "3", "--fp16", "--cache", str(tmp_path / "cache")]
    assert mod.main(base + ["--out", str(tmp_path / "exact.jsonl")]) == 0
    exact = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "recall" not in exact  # exact search has nothing to measure
    assert mod.main(base + ["--out", str(tmp_path / "hnsw.jsonl"), "--index", "hnsw", "--hnsw-m", "8",
                            "--recall-sample", "5"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["recall"]["recall_sample"] == 5 and stats["recall"][f"recall@{stats['k_retrieved']}"] == 1.0
    prov = load_spec(tmp_path / "hnsw.yaml").provenance
    assert prov["index"] == "hnsw" and prov["hnsw_m"] == 8 and prov["store_dtype"] == "float16"
    # the same negatives up to ties (bag-of-words vectors: documents of a topic score alike)
    rows = lambda n: [json.loads(l)["negative_scores"] for l in (tmp_path / n).read_text().splitlines()]  # noqa
    np.testing.assert_allclose(rows("hnsw.jsonl"), rows("exact.jsonl"), atol=1e-6)
    assert len(list((tmp_path / "cache").glob("*/embeddings.npy"))) == 2  # one corpus + one query store, reused
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a setting FAISS cannot build: one line, exit 2, nothing written
        mod.main(base + ["--out", str(tmp_path / "pq.jsonl"), "--index", "ivfpq", "--pq-m", "7"])
    assert e.value.code == 2 and "nvembed: search error: pq_m=7 must divide the embedding dimension 64" in \
        capsys.readouterr().err
    assert not (tmp_path / "pq.jsonl").exists()
