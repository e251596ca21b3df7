#!/usr/bin/env python
"""Evaluate an embedding model on a BEIR folder or an eval suite; prints one JSON line.

    python scripts/evaluate.py MODEL --beir data_specs/eval/beir/cisi [--instruction "..."]
    python scripts/evaluate.py MODEL --suite data_specs/eval/demo.yaml [--table out.md] [--chart out.png]
    python scripts/evaluate.py MODEL --beir data_specs/eval/beir/adi --truncate-dim 256   # Matryoshka: first 256 dims
    python scripts/evaluate.py MODEL --mteb data_specs/eval/beir/adi data_specs/eval/sts/stsbenchmark-test.jsonl
    python scripts/evaluate.py MODEL --mteb SciFact STSBenchmark   # mteb's own evaluation; task names need the hub
    python scripts/evaluate.py MODEL --beir /data/msmarco --index ivfpq --store-dir /scratch   # a very large corpus

MODEL: a sentence-transformers folder, ``bm25``, or an nvembed model folder (AutoModel with ``.encode``); see
``nvembed.eval.encoders.load_encoder``. Runs offline (HF_HUB_OFFLINE=1 is set unless already defined).

``--beir`` keeps the corpus on disk: its embeddings go to a temporary store (``--store-dir``: n x dim x 4 bytes) as
they are encoded and are searched from there, exactly (default) or through a FAISS index (``--index``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvembed.errors import cli  # noqa: E402


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder, or 'bm25'")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--beir", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    g.add_argument("--suite", help="eval suite YAML (e.g. data_specs/eval/demo.yaml)")
    g.add_argument("--mteb", nargs="+", metavar="TASK",
                   help="run mteb's evaluation: mteb task names (data from the hub), BEIR folders, STS .jsonl files")
    ap.add_argument("--instruction", default=None, help="query instruction for --beir (and --mteb local tasks)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-queries", type=int, default=None)
    ap.add_argument("--max-corpus", type=int, default=None)
    ap.add_argument("--max-doc-chars", type=int, default=None)
    ap.add_argument("--tasks", nargs="*", default=None, help="suite: only these task names")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--name", default=None, help="model name in outputs")
    ap.add_argument("--instructions", dest="use_instructions", action="store_true", default=None,
                    help="force instruction prompts on (sentence-transformers models)")
    ap.add_argument("--no-instructions", dest="use_instructions", action="store_false",
                    help="encode queries without instruction prompts (e.g. all-MiniLM)")
    ap.add_argument("--max-seq-length", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--table", default=None, help="suite: also write a markdown results table here")
    ap.add_argument("--chart", default=None, help="suite: also write a PNG bar chart here")
    ap.add_argument("--truncate-dim", type=int, default=None, metavar="D",
                    help="evaluate the first D embedding dimensions, re-normalised (Matryoshka)")
    ap.add_argument("--index", default="exact", choices=["exact", "flat", "ivf", "ivfpq", "hnsw"],
                    help="--beir: exact search streamed over the stored embeddings (default), or a FAISS index "
                         "(flat: exact in RAM; ivf/ivfpq/hnsw: approximate, at nvembed.mining.index defaults)")
    ap.add_argument("--store-dir", default=None,
                    help="--beir: folder for the temporary corpus embedding store (default: the system temp folder)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow Python code shipped in the model folder to run (nvembed exports never need it)")
    ap.add_argument("--allow-missing-docs", action="store_true",
                    help="drop (and count) judgments naming documents or queries absent from the BEIR folder "
                         "instead of failing")
    a = ap.parse_args(argv)

    tasks = None
    if a.mteb:  # tasks resolved and their data loaded before the model: a task that cannot run fails first
        from nvembed.eval.mteb_wrapper import load_task_data, resolve_tasks

        if a.model.lower() == "bm25":
            ap.error("--mteb needs an embedding model, not bm25")
        tasks = resolve_tasks(a.mteb, instruction=a.instruction, split=a.split, max_queries=a.max_queries,
                              max_corpus=a.max_corpus, max_doc_chars=a.max_doc_chars,
                              allow_missing_docs=a.allow_missing_docs, log=lambda m: print(m, file=sys.stderr))
        load_task_data(tasks)

    from nvembed.eval.encoders import load_encoder

    t0 = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if a.beir:  # bad data fails before the model loads (the corpus is checked, not loaded)
        from nvembed.eval.retrieval import open_beir

        beir_data = open_beir(a.beir, a.split, allow_missing_docs=a.allow_missing_docs, log=log)
        if a.store_dir and not Path(a.store_dir).is_dir():
            from nvembed.mining.store import StoreError

            raise StoreError(f"--store-dir {a.store_dir}: no such folder (the corpus embeddings are written there)")
    elif a.suite:
        from nvembed.eval.suite import load_suite

        load_suite(a.suite)
    model = load_encoder(a.model, name=a.name, use_instructions=a.use_instructions,
                         max_seq_length=a.max_seq_length, device=a.device, trust_remote_code=a.trust_remote_code)
    if a.truncate_dim is not None:
        from nvembed.eval.encoders import BM25Retriever, TruncatedEncoder

        if isinstance(model, BM25Retriever):
            ap.error("--truncate-dim needs an embedding model, not bm25")
        if a.truncate_dim < 1:
            ap.error("--truncate-dim must be >= 1")
        model = TruncatedEncoder(model, a.truncate_dim)
    if a.mteb:
        from nvembed.eval.mteb_wrapper import MTEBEncoderWrapper, run_mteb

        res = run_mteb(MTEBEncoderWrapper(model), tasks, batch_size=a.batch_size, show_progress=a.progress)
        for t, r in res.items():
            print(f"mteb {t}: {r['main_score']} = {r['value']:.5f}", file=sys.stderr)
        out = {"model": model.name, **{f"{t}/{r['main_score']}": round(r["value"], 5) for t, r in res.items()}}
    elif a.beir:
        from nvembed.eval.retrieval import evaluate_retrieval
        from nvembed.mining.index import SearchConfig

        search = None if a.index == "exact" else SearchConfig(index=a.index)
        res = evaluate_retrieval(model, a.beir, instruction=a.instruction, split=a.split, max_queries=a.max_queries,
                                 max_corpus=a.max_corpus, max_doc_chars=a.max_doc_chars, batch_size=a.batch_size,
                                 show_progress=a.progress, data=beir_data, search=search, store_dir=a.store_dir)
        out = {"model": model.name, "dataset": Path(a.beir).name, **{k: round(v, 5) if isinstance(v, float) else v
                                                                       for k, v in res.items()}}
    else:
        from nvembed.eval.suite import format_results_table, run_suite, write_bar_chart

        res = run_suite(model, a.suite, tasks=a.tasks, batch_size=a.batch_size, show_progress=a.progress,
                        log=log, allow_missing_docs=a.allow_missing_docs)
        if a.table:
            Path(a.table).write_text(format_results_table({model.name: res}) + "\n", encoding="utf-8")
        if a.chart:
            write_bar_chart({model.name: res}, a.chart, title=f"{res['suite']} suite")
        out = {"model": model.name, "suite": res["suite"],
               **{f"{t}/{k}": round(v, 5) for t, r in res["tasks"].items() for k, v in r.items()
                  if isinstance(v, float) and k not in ("main_score", "seconds")},
               **{f"avg/{k}": round(v, 5) for k, v in res["average"].items()}}
    if a.truncate_dim is not None:
        out["truncate_dim"] = a.truncate_dim
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
