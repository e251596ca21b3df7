#!/usr/bin/env python
"""Gecko FRet: LLM writes (task, query) per seed passage; an initial embedder retrieves the top-N; the LLM reranks
them by query likelihood (QL) and relevance classification (RC); R = 1/r_QL + 1/r_RC; top = positive,
rank --negative-rank = hard negative.

    python scripts/fret.py --passages corpus.jsonl --embedder /path/to/all-MiniLM-L6-v2 --query-encoding concat \
        --backend transformers --top-n 20 --negative-rank 20 --num-seeds 100 --out runs/fret
    python scripts/fret.py --passages corpus.txt --embedder EMB --backend openai --base-url http://vllm:8000/v1 \
        --model Qwen/Qwen2.5-7B-Instruct --concurrency 32 --out runs/fret

Passages: JSONL (id + text[/title]) or TXT (one per line), read from disk by row, never all in memory. QL needs
token logprobs of given text (/completions with echo): use a vLLM-style server, or --scorers rc for chat-only APIs
(RC then uses the chat endpoint's logprobs).
Re-running resumes. Output: OUT/examples.jsonl, OUT/queries.jsonl, OUT/stats.json, OUT/specs/*.yaml.
An endpoint that cannot be reached stops the run (exit 2, naming the URL and the cause; what succeeded is kept).
The embedder's own Python code runs only with --trust-remote-code (nvembed exports load without it).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nvembed.errors import cli  # noqa: E402


@cli
def main(argv=None) -> int:
    from synthesize import add_backend_args, make_llm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backend_args(ap)
    ap.add_argument("--passages", required=True, help="passage collection: JSONL or TXT")
    ap.add_argument("--embedder", required=True, help="initial embedder folder (nvembed.eval.encoders.load_encoder)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow Python code shipped in the embedder folder to run (nvembed exports never need it)")
    ap.add_argument("--use-instructions", choices=["auto", "yes", "no"], default="auto",
                    help="embedder prompt use (auto: load_encoder's heuristic)")
    ap.add_argument("--query-encoding", choices=["instruction", "concat"], default="instruction",
                    help="task as the query instruction, or task+query concatenated as plain text")
    ap.add_argument("--out", required=True)
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--negative-rank", type=int, default=20, help="fused rank of the hard negative (1 = none)")
    ap.add_argument("--num-seeds", type=int, default=None, help="seed passages sampled (default: all)")
    ap.add_argument("--no-include-seed", action="store_true", help="do not force the seed into the candidates")
    ap.add_argument("--scorers", nargs="+", choices=["ql", "rc"], default=["ql", "rc"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-passage-chars", type=int, default=2000)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="stop after this many seeds processed (resume later)")
    ap.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    ap.add_argument("--spec-mode", choices=["auto", "row", "task"], default="auto")
    ap.add_argument("--name", default="fret")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from nvembed.eval.encoders import load_encoder
    from nvembed.synth import FRetConfig, read_passages, run_fret
    from nvembed.synth.loop import check_run

    passages = read_passages(args.passages)  # file:line errors before the embedder loads
    try:
        ui = None if args.use_instructions == "auto" else args.use_instructions == "yes"
        encoder = load_encoder(args.embedder, use_instructions=ui, device=args.device,
                               trust_remote_code=args.trust_remote_code)
        cfg = FRetConfig(top_n=args.top_n, negative_rank=args.negative_rank, num_seeds=args.num_seeds,
                         include_seed=not args.no_include_seed, scorers=args.scorers, seed=args.seed,
                         temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                         max_passage_chars=args.max_passage_chars, chunk_size=args.chunk_size, limit=args.limit,
                         query_encoding=args.query_encoding, stages=args.stages, spec_mode=args.spec_mode,
                         name=args.name)
        llm = make_llm(args)
        stats = run_fret(llm, encoder, passages, args.out, cfg, show_progress=not args.no_progress)
    finally:
        passages.close()
    print(json.dumps(stats, indent=2))
    check_run(llm, stats, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
