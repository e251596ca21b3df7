#!/usr/bin/env python
"""Mining search benchmarks (not a test). Three modes:

``--scale``: a corpus store on disk of ``--docs`` clustered synthetic unit vectors (``--fp16``: float16 on disk),
written chunk by chunk through ``nvembed.mining.store`` (the miner's own format), then each ``--methods`` entry
(exact streamed, ivf, ivfpq, hnsw, flat) runs in its own process so each peak RSS is its own: build time, search
time, peak RSS (``ru_maxrss``) and recall@k / @10 / @1 against the exact streamed search. The corpus never lives in
RAM: peak RSS = the process (torch + faiss) + the index + one chunk.

    python scripts/bench_mining.py --scale --docs 1000000 --dim 256 --fp16 --queries 2000 --k 100 --work /tmp/bm

Vectors: ``--clusters`` random unit centres, each point a centre plus Gaussian noise of norm ``--noise``,
re-normalised; queries drawn the same way (so near neighbours are real and recall is meaningful).

``--prepare-text DIR``: writes ``DIR/pairs.jsonl`` and ``DIR/corpus.jsonl`` from every text collection in the
repository and ``/work/shared/data`` (the largest real corpus at hand) for a real-text run of
``scripts/mine_hard_negatives.py`` (commands in docs/benchmarks.md).

``--text-memory N``: the miner's memory on text, not vectors: writes ``N`` pairs (every 3rd query repeated, so
rows are merged) and ``N`` corpus rows of ``--width`` characters, mines them with ``mine_file`` and a hashing
encoder (dim 8: the store and the search are negligible), reports wall time and peak RSS. Run it at two sizes: what
grows is what the miner keeps per row.

``--beir-eval N``: retrieval evaluation (``nvembed.eval.retrieval.evaluate_retrieval``) over a generated BEIR folder
of ``N`` documents of ``--width`` characters and ``--queries`` queries (each the text of its one relevant document,
so a right pipeline scores nDCG@10 = 1), with a hashing encoder of ``--dim`` (default 384) dimensions; one process
for the code at hand and one for the code before issue #17 (``--old-rev``, read with ``git show``): wall time, peak
RSS (VmHWM) and the metrics, which must agree.

    python scripts/bench_mining.py --beir-eval 1000000 --queries 1000 --work /tmp/bm

``--beir-eval N --bm25``: the same folder evaluated with the BM25 baseline instead: the streamed BM25 at hand
(``nvembed.eval.bm25``) against bm25s over the whole corpus (``--old-rev`` defaults to the commit before it). Each
query is a whole document (~80 tokens, the generator's 12 words in every document): a heavy case for any BM25.

    python scripts/bench_mining.py --beir-eval 200000 --queries 200 --bm25 --work /tmp/bm

Default (no mode flag): the memory of chunked top-k against the full score matrix it avoids, on random vectors
held in RAM (``--docs 200000 --dim 384``); ``--faiss`` also times FAISS IndexFlatIP.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _proc import peak_rss_mb, proc_status  # noqa: E402  (scripts/_proc.py: this script's folder is on sys.path)


rss_mb = peak_rss_mb


def current_rss_mb() -> float:
    return proc_status("VmRSS").get("VmRSS", float("nan"))


# ------------------------------------------------------------------------------------------------ --scale


def _clustered(rng, centres, n, noise):
    x = centres[rng.integers(0, len(centres), n)]
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * (noise / np.sqrt(x.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(a) -> Path:
    """The corpus store and queries under ``--work`` (reused when already complete)."""
    from nvembed.mining.store import EmbeddingStore

    work = Path(a.work)
    folder = work / f"corpus-{a.docs}x{a.dim}-{'fp16' if a.fp16 else 'fp32'}-c{a.clusters}-n{a.noise}"
    if (folder / "meta.json").is_file() and EmbeddingStore(folder).complete():
        return folder
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    store = EmbeddingStore.create(folder, n=a.docs, dim=a.dim, dtype="float16" if a.fp16 else "float32",
                                  chunk_size=65536, meta={"model": "synthetic"})
    for c in range(store.n_chunks):
        lo, hi = store.chunk_rows(c)
        store.write_chunk(c, _clustered(np.random.default_rng([1, c]), centres, hi - lo, a.noise))
    np.save(folder / "queries.npy", _clustered(np.random.default_rng(2), centres, a.queries, a.noise))
    return folder


def _index_mb(index, store) -> float:
    """What the index holds: vectors/codes + ids (+ HNSW links), from FAISS's own sizes."""
    if index is None:
        return 0.0
    import faiss

    n = index.ntotal
    if isinstance(index, faiss.IndexHNSWFlat):
        return (n * store.dim * 4 + index.hnsw.neighbors.size() * 4) / 2**20
    if isinstance(index, faiss.IndexIVFPQ):
        return n * (index.pq.code_size + 8) / 2**20
    return n * (store.dim * 4 + (8 if isinstance(index, faiss.IndexIVF) else 0)) / 2**20


def run_one(a) -> int:
    """Child process: one method over the store, searched once per ``--nprobe`` / ``--ef-search`` value (the
    index is built once); prints a JSON line per search and saves its ids."""
    import dataclasses

    import torch

    from nvembed.mining.index import SearchConfig, build_index, search
    from nvembed.mining.store import EmbeddingStore

    store = EmbeddingStore(a.store)
    queries = np.load(Path(a.store) / "queries.npy")
    nprobes, efs = [int(v) for v in a.nprobe.split(",")], [int(v) for v in a.ef_search.split(",")]
    cfg = SearchConfig(index=a.one, nlist=a.nlist, nprobe=max(nprobes), pq_m=a.pq_m, hnsw_m=a.hnsw_m,
                       ef_construction=a.ef_construction, ef_search=efs[0], doc_chunk_size=a.doc_chunk_size,
                       add_chunk_size=a.doc_chunk_size)
    base = rss_mb()
    t = time.perf_counter()
    index = build_index(store, cfg)
    build_s = time.perf_counter() - t
    sweep = [dataclasses.replace(cfg, nprobe=p) for p in nprobes] if a.one in ("ivf", "ivfpq") else \
        [dataclasses.replace(cfg, ef_search=e) for e in efs] if a.one == "hnsw" else [cfg]
    for c in sweep:
        if a.one in ("ivf", "ivfpq"):
            index.nprobe = c.nprobe
        t = time.perf_counter()
        _, ids = search(queries, store, a.k, c, index)
        search_s = time.perf_counter() - t
        now = current_rss_mb()
        tag = "-".join(f"{k}{v}" for k, v in c.to_dict().items() if k != "index")
        np.save(Path(a.store) / f"ids-{a.one}{'-' + tag if tag else ''}.npy", ids)
        print(json.dumps({"method": a.one, "ids": f"ids-{a.one}{'-' + tag if tag else ''}.npy", **c.to_dict(),
                          "build_s": round(build_s, 1), "search_s": round(search_s, 1),
                          "qps": round(len(queries) / search_s, 1), "peak_rss_after_imports_mb": round(base),
                          "rss_after_search_mb": round(now), "index_bytes_mb": round(_index_mb(index, store)),
                          "peak_rss_mb": round(rss_mb()), "threads": torch.get_num_threads()}), flush=True)
    return 0


def scale(a) -> int:
    from nvembed.mining.index import recall_at_k

    t = time.perf_counter()
    folder = make_data(a)
    gen_s = time.perf_counter() - t
    disk = (folder / "embeddings.npy").stat().st_size
    print(json.dumps({"docs": a.docs, "dim": a.dim, "queries": a.queries, "k": a.k, "store": str(folder),
                      "store_mb": round(disk / 2**20), "corpus_fp32_mb": round(a.docs * a.dim * 4 / 2**20),
                      "generate_s": round(gen_s, 1)}), flush=True)
    rows = []
    methods = a.methods.split(",")
    if "exact" in methods:
        methods = ["exact"] + [m for m in methods if m != "exact"]
    for m in methods:
        cmd = [sys.executable, __file__, "--one", m, "--store", str(folder), "--k", str(a.k),
               "--nprobe", a.nprobe, "--pq-m", str(a.pq_m), "--hnsw-m", str(a.hnsw_m),
               "--ef-construction", str(a.ef_construction), "--ef-search", a.ef_search,
               "--doc-chunk-size", str(a.doc_chunk_size)] + (["--nlist", str(a.nlist)] if a.nlist else [])
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        wall = round(time.perf_counter() - t, 1)
        for line in out.stdout.splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            row["process_wall_s"] = wall
            if m != "exact" and (folder / "ids-exact.npy").is_file():
                ex, ap = np.load(folder / "ids-exact.npy"), np.load(folder / row["ids"])
                row.update({f"recall@{a.k}": round(recall_at_k(ap, ex), 4),
                            "recall@10": round(recall_at_k(ap, ex, 10), 4),
                            "recall@1": round(recall_at_k(ap, ex, 1), 4)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ --prepare-text

SHARED = Path("/work/shared/data")


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_text(out: Path) -> int:
    """Pairs (QNLI train + dev entailed sentences, MedQuAD) and a corpus of every text at hand, deduplicated."""
    files = REPO / "data_specs" / "demo" / "files"
    pairs, corpus = [], {}

    def doc(t):
        t = (t or "").strip()
        if t:
            corpus.setdefault(t, None)

    for r in _jsonl(files / "qnli_train.jsonl"):
        pairs.append({"query": r["question"], "positives": r["positives"]})
        for t in r["positives"] + r.get("negatives", []):
            doc(t)
    answers = {r["id"]: r["text"] for r in _jsonl(files / "medquad_corpus.jsonl")}
    for t in answers.values():
        doc(t)
    for r in _jsonl(files / "medquad_train.jsonl"):
        if r.get("question") and r.get("answer_id") in answers:
            pairs.append({"query": r["question"], "positives": [answers[r["answer_id"]]]})
    dev = SHARED / "qnli-dev" / "dev.tsv"
    if dev.is_file():
        with open(dev, encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                doc(r.get("sentence"))
                if r.get("label") == "entailment" and r.get("question") and r.get("sentence"):
                    pairs.append({"query": r["question"], "positives": [r["sentence"]]})
    for name in ("stsb_train", "banking77_train", "trec_train"):
        for r in _jsonl(files / f"{name}.jsonl"):
            for key in ("text1", "text2", "text"):
                doc(r.get(key))
    for beir in sorted((REPO / "data_specs" / "eval" / "beir").glob("*/corpus.jsonl")):
        for r in _jsonl(beir):
            doc(f"{r['title']}. {r['text']}" if r.get("title") else r.get("text"))
    news = SHARED / "ag-news" / "test.csv"
    if news.is_file():
        with open(news, encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) >= 3 and row[0] != "label":
                    doc(f"{row[1]}. {row[2]}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(corpus))
    print(json.dumps({"pairs": len(pairs), "corpus": len(corpus), "dir": str(out)}))
    return 0


# ------------------------------------------------------------------------------------------------ default mode


def text_memory(a) -> int:
    import hashlib

    from nvembed.mining import MiningRule, SearchConfig, mine_file

    class HashVectors:  # a text -> 8 numbers from its hash: the encoder costs nothing
        name = "hash8"

        def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
            raw = b"".join(hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts)
            out = np.frombuffer(raw, dtype=np.int8).reshape(len(texts), 8).astype(np.float32) + 0.5
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    n, work = a.text_memory, Path(a.work) / f"text{a.text_memory}"
    work.mkdir(parents=True, exist_ok=True)
    pairs, corpus = work / "pairs.jsonl", work / "corpus.jsonl"
    words = np.array("alpha beta gamma delta kappa sigma omega rho".split())
    text = lambda *key: " ".join(np.random.default_rng(key).choice(words, a.width // 6))[:a.width]  # noqa: E731
    with open(pairs, "w") as fp, open(corpus, "w") as fc:  # written row by row: generating sets no RSS peak
        for i in range(n):
            fc.write(json.dumps({"_id": f"d{i}", "text": text(0, i)}) + "\n")
            fp.write(json.dumps({"query": text(1, i - i % 3), "positive": text(2, i), "row": i}) + "\n")
    mb = (pairs.stat().st_size + corpus.stat().st_size) / 2**20
    before, t0 = rss_mb(), time.perf_counter()
    stats = mine_file(HashVectors(), pairs, work / "mined.jsonl", corpus_path=corpus,
                      rule=MiningRule(rule="topk", range_max=10, num_negatives=4), encode_chunk_size=4096,
                      search_config=SearchConfig(query_chunk_size=512, doc_chunk_size=16384), show_progress=False)
    print(json.dumps({"rows": n, "width": a.width, "input_mb": round(mb, 1), "queries": stats["num_queries"],
                      "corpus": stats["corpus_size"], "seconds": round(time.perf_counter() - t0, 1),
                      "rss_before_mb": round(before), "peak_rss_mb": round(rss_mb()),
                      "out_mb": round((work / "mined.jsonl").stat().st_size / 2**20, 1)}))
    return 0


def chunked(a) -> int:
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


class HashEncoder:
    """A text -> ``dim`` numbers from its BLAKE2b digest (repeated with alternating signs), normalised: costs next to
    nothing, equal texts get equal vectors. Encodes ``batch_size`` texts at a time and stacks the batches, as
    sentence-transformers does (no temporaries of the whole input's size)."""

    name = "hash"

    def __init__(self, dim: int):
        self.dim = dim

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        if len(texts) > batch_size:
            return np.concatenate([self.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        import hashlib

        raw = b"".join(hashlib.blake2b(t.encode(), digest_size=64).digest() for t in texts)
        x = np.frombuffer(raw, dtype=np.int8).reshape(len(texts), 64).astype(np.float32) + 0.5
        reps = -(-self.dim // 64)
        x = np.tile(x, reps)[:, :self.dim] * np.repeat(np.resize([1.0, -1.0], reps), 64)[:self.dim]
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_beir(a) -> Path:
    """``--beir-eval`` folder under ``--work`` (written row by row, kept for the next run)."""
    folder = Path(a.work) / f"beir{a.beir_eval}x{a.width}"
    if (folder / "qrels" / "test.tsv").is_file():
        return folder
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    words = np.array("alpha beta gamma delta kappa sigma omega rho theta lambda zeta iota".split())
    rng = np.random.default_rng(0)
    rel = set(rng.choice(a.beir_eval, a.queries, replace=False).tolist())
    with open(folder / "corpus.jsonl", "w") as fc, open(folder / "queries.jsonl", "w") as fq, \
            open(folder / "qrels" / "test.tsv", "w") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for i in range(a.beir_eval):
            text = f"{i} " + " ".join(rng.choice(words, a.width // 6))[:a.width]
            fc.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
            if i in rel:
                fq.write(json.dumps({"_id": f"q{i}", "text": text}) + "\n")
                fr.write(f"q{i}\td{i}\t1\n")
    return folder


def beir_one(a) -> int:
    """Child of ``--beir-eval``: one evaluation with the current (``new``) or the old (``old``) retrieval code."""
    import torch

    from nvembed.eval import retrieval  # imported by both: the same modules loaded before measuring

    mod = retrieval
    if a.beir_one == "old":
        mod = _load(Path(a.work) / "old_retrieval.py")
    bm25 = None
    if a.bm25:
        import bm25s  # noqa: F401  (both codes use it: loaded before measuring)
        import scipy.sparse  # noqa: F401

        from nvembed.eval.encoders import BM25Retriever

        bm25 = _load(Path(a.work) / "old_encoders.py").BM25Retriever() if a.beir_one == "old" else BM25Retriever()

    before, t0 = rss_mb(), time.perf_counter()
    if bm25 is None:
        res = mod.evaluate_retrieval(HashEncoder(a.dim), a.beir_folder, batch_size=256)
    else:  # evaluate_retrieval's BM25 path, called with this code's (or the old code's) BM25Retriever
        beir = mod.open_beir(a.beir_folder)
        res = mod.evaluate_run(beir.qrels, mod.bm25_search(bm25, beir.corpus, beir.queries, k=100))
        res.update({"num_queries": len(beir.queries), "num_docs": len(beir.corpus)})
    print(json.dumps({"code": a.beir_one, **{k: round(v, 6) if isinstance(v, float) else v for k, v in res.items()},
                      "seconds": round(time.perf_counter() - t0, 1), "rss_before_mb": round(before),
                      "peak_rss_mb": round(rss_mb()), "threads": torch.get_num_threads()}), flush=True)
    return 0


def _load(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def beir_eval(a) -> int:
    folder = make_beir(a)
    size = (folder / "corpus.jsonl").stat().st_size / 2**20
    rev = a.old_rev or ("05d9d58" if a.bm25 else "f1cf4ce")
    for name in ("retrieval", "encoders"):
        old = subprocess.run(["git", "show", f"{rev}:nvembed/eval/{name}.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        (Path(a.work) / f"old_{name}.py").write_text(old)
    rows = []
    for code in a.beir_codes.split(","):
        cmd = [sys.executable, __file__, "--beir-one", code, "--beir-folder", str(folder), "--work", a.work,
               "--dim", str(a.dim)] + (["--bm25"] if a.bm25 else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        what = {"model": "bm25"} if a.bm25 else {"dim": a.dim}
        print(json.dumps({"docs": a.beir_eval, "corpus_mb": round(size), **what, **rows[-1]}), flush=True)
    metrics = [{k: r[k] for k in ("ndcg@10", "recall@100", "mrr@10", "num_docs")} for r in rows]
    print(json.dumps({"same_metrics": all(m == metrics[0] for m in metrics)}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", action="store_true", help="store on disk + exact/ivf/ivfpq/hnsw, one process each")
    ap.add_argument("--prepare-text", default=None, metavar="DIR", help="write pairs/corpus for a real-text run")
    ap.add_argument("--text-memory", type=int, default=None, metavar="N", help="mine N generated text rows")
    ap.add_argument("--width", type=int, default=500, help="--text-memory: characters a text")
    ap.add_argument("--docs", type=int, default=None, help="default 1000000 with --scale, else 200000")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=None, help="default 256 with --scale, else 384")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--fp16", action="store_true", help="--scale: float16 on disk")
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.7, help="norm of the noise added to a unit cluster centre")
    ap.add_argument("--methods", default="exact,ivf,ivfpq,hnsw")
    ap.add_argument("--work", default="/tmp/nvembed-bench-mining")
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", default="32", help="IVF lists probed; a comma list searches the index once each")
    ap.add_argument("--pq-m", type=int, default=32)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", default="128", help="HNSW beam; a comma list searches the index once each")
    ap.add_argument("--query-chunk-size", type=int, default=512)
    ap.add_argument("--doc-chunk-size", type=int, default=None, help="default 65536 with --scale, else 16384")
    ap.add_argument("--faiss", action="store_true")
    ap.add_argument("--beir-eval", type=int, default=None, metavar="N", help="evaluate on a generated N-doc folder")
    ap.add_argument("--old-rev", default=None, help="--beir-eval: a commit before the corpus moved to disk "
                    "(default f1cf4ce; with --bm25 05d9d58, the last with bm25s over the whole corpus)")
    ap.add_argument("--bm25", action="store_true", help="--beir-eval: the BM25 baseline instead of an encoder")
    ap.add_argument("--beir-codes", default="new,old", help="--beir-eval: which code to run (new, old)")
    ap.add_argument("--beir-one", default=None, help=argparse.SUPPRESS)  # child process of --beir-eval
    ap.add_argument("--beir-folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process of --scale
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    big = a.scale or a.one
    a.docs = a.docs or (1_000_000 if big else 200_000)
    a.dim = a.dim or (256 if big else 384)
    if a.beir_one:
        return beir_one(a)
    if a.beir_eval:
        return beir_eval(a)
    a.doc_chunk_size = a.doc_chunk_size or (65536 if big else 16384)
    if a.one:
        return run_one(a)
    if a.prepare_text:
        return prepare_text(Path(a.prepare_text))
    if a.text_memory:
        return text_memory(a)
    return scale(a) if a.scale else chunked(a)


if __name__ == "__main__":
    sys.exit(main())
