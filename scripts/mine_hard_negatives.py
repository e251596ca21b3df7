#!/usr/bin/env python
"""Mine hard negatives for query/positive pairs with a teacher embedder (positive-aware, NV-Retriever rules).

    python scripts/mine_hard_negatives.py --teacher TEACHER_DIR --input pairs.jsonl [--corpus corpus.jsonl] \
        --rule topk_percpos --margin 0.95 --range 0 50 --num-negatives 4 --out mined/train.jsonl \
        [--cache .cache/emb] [--index exact|flat|ivf|ivfpq|hnsw] [--fp16] \
        [--instruction "Given a question, retrieve passages that answer it"]
    accelerate launch --num_processes 8 scripts/mine_hard_negatives.py ... --cache /shared/emb   # sharded encode

Input JSONL rows: ``{"query": ..., "positive": ...}`` or ``{"query": ..., "positives": [...]}`` (rows with the same
query are merged). Corpus: JSONL with ``text`` (+``title``) or ``.txt`` lines; default = the pool of positives.
Writes ``--out`` (JSONL: query, positives, negatives, negative_scores, positive_scores) and its data spec
``<out>.yaml`` (or ``--spec``), which the trainer loads as is: ``stage_defs.stage1.datasets=[/abs/path/out.yaml]``.
The spec's instruction is ``--instruction`` (also given to the teacher unless ``--no-instructions``); the mining
parameters are recorded under its ``provenance``.

Scale: corpus and query embeddings are written to disk as they are encoded (``--cache`` folder, else a temporary
one; ``--fp16`` halves it) and a killed run resumes at the last complete chunk. Under ``accelerate launch`` each
process encodes its share of the chunks into the same files, then rank 0 searches and writes. ``--index exact``
streams the corpus from disk (exact, memory = one chunk + queries x k); ``ivf``/``ivfpq``/``hnsw`` build a FAISS
index chunk by chunk (``--nlist --nprobe --pq-m --hnsw-m --ef-search``) and report their recall@k against exact
search on ``--recall-sample`` queries in the printed stats (``recall``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvembed.errors import cli  # noqa: E402


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher model folder (see nvembed.eval.encoders.load_encoder)")
    ap.add_argument("--input", "--queries", dest="input", required=True, help="query/positive JSONL")
    ap.add_argument("--corpus", default=None, help="candidate documents (JSONL or .txt); default: positives pool")
    ap.add_argument("--out", required=True, help="output JSONL (spec YAML written next to it)")
    ap.add_argument("--spec", default=None, help="where to write the data spec (default: --out with .yaml)")
    ap.add_argument("--name", default=None, help="dataset name in the spec (default: the --out file stem)")
    ap.add_argument("--rule", default="topk_percpos", choices=["topk_percpos", "topk_marginpos", "topk_abs", "topk"])
    ap.add_argument("--margin", type=float, default=None,
                    help="rule parameter (defaults: percpos 0.95, marginpos 0.05, abs 0.7)")
    ap.add_argument("--range", nargs=2, type=int, default=[0, 50], metavar=("MIN", "MAX"),
                    help="candidate rank window [MIN, MAX) after removing positives; MAX<=0 = no upper bound")
    ap.add_argument("--num-negatives", type=int, default=4)
    ap.add_argument("--sampling", default="top", choices=["top", "random"])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--instruction", default=None,
                    help="the task's one-sentence instruction: for the teacher's queries and the written spec "
                         "(default in the spec: 'Given a query, retrieve relevant documents')")
    ap.add_argument("--no-instructions", action="store_true", help="teacher ignores instructions (e.g. MiniLM)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow Python code shipped in the teacher folder to run (nvembed exports never need it)")
    ap.add_argument("--cache", default=None, help="embedding cache folder (resumable)")
    ap.add_argument("--faiss", action="store_true", help="same as --index flat (FAISS IndexFlatIP)")
    ap.add_argument("--index", default=None, choices=["exact", "flat", "ivf", "ivfpq", "hnsw"],
                    help="exact: streamed from disk (default); flat: FAISS exact in RAM; ivf/ivfpq/hnsw: approximate")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(n))")
    ap.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query")
    ap.add_argument("--pq-m", type=int, default=32, help="IVF-PQ bytes per vector (divides the dimension)")
    ap.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--recall-sample", type=int, default=1000,
                    help="queries on which an approximate index's recall@k vs exact search is measured (0: skip)")
    ap.add_argument("--fp16", action="store_true", help="store embeddings on disk as float16")
    ap.add_argument("--encode-chunk-size", type=int, default=4096, help="texts per written (resumable) chunk")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--query-chunk-size", type=int, default=1024)
    ap.add_argument("--doc-chunk-size", type=int, default=65536)
    ap.add_argument("--max-seq-length", type=int, default=None)
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)

    from nvembed.eval.encoders import load_encoder
    from nvembed.mining import MiningRule, Ranks, SearchConfig, mine_file

    try:
        rule = MiningRule(rule=a.rule, margin=a.margin, range_min=a.range[0],
                          range_max=a.range[1] if a.range[1] > 0 else None, num_negatives=a.num_negatives,
                          sampling=a.sampling, seed=a.seed)
    except ValueError as e:
        ap.error(str(e))
    if a.encode_chunk_size < 1:
        ap.error("--encode-chunk-size must be >= 1")
    search = SearchConfig(index=a.index or ("flat" if a.faiss else "exact"), nlist=a.nlist, nprobe=a.nprobe,
                          pq_m=a.pq_m, hnsw_m=a.hnsw_m, ef_construction=a.ef_construction, ef_search=a.ef_search,
                          recall_sample=a.recall_sample, query_chunk_size=a.query_chunk_size,
                          doc_chunk_size=a.doc_chunk_size)
    ranks = Ranks()
    device = a.device
    if device is None and ranks.device is not None and ranks.device.type != "cpu":
        device = str(ranks.device)  # one accelerator per process
    teacher = load_encoder(a.teacher, use_instructions=False if a.no_instructions else None,
                           max_seq_length=a.max_seq_length, device=device, trust_remote_code=a.trust_remote_code)
    stats = mine_file(teacher, a.input, a.out, corpus_path=a.corpus, rule=rule, instruction=a.instruction,
                      spec_path=a.spec, name=a.name, batch_size=a.batch_size, cache_dir=a.cache,
                      search_config=search, store_dtype="float16" if a.fp16 else "float32",
                      encode_chunk_size=a.encode_chunk_size, ranks=ranks, show_progress=ranks.rank == 0)
    if ranks.rank == 0:
        print(json.dumps({"out": a.out, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
