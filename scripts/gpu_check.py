"""One-GPU check: a few bf16 training steps of nvembed's embedder on a random-init backbone; tokens/s and MFU.

Needs torch, transformers, peft, safetensors, numpy, omegaconf (imported by nvembed.config; a stub is used if it is
missing). No deepspeed / hydra / datasets / wandb, no downloads. MFU = 6 * N * tokens / time / peak (N: non-embedding
parameters; for LoRA runs 4 * N is also printed, as frozen weights get no weight gradients).

    python scripts/gpu_check.py                      # ~1.1B Llama, full fine-tuning, 96 x 256 tokens per step
    python scripts/gpu_check.py --preset mistral7b   # Mistral-7B shape + LoRA
    python scripts/gpu_check.py --preset tiny        # CPU smoke test of this script
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 scripts/gpu_check.py --zero 3
                                                     # the same steps through nvembed's DeepSpeed path (bf16 engine)

``scripts/gpu_check.sh`` runs the prepared set (under 10 minutes on one GPU); ``gpu_check.sh --dry`` runs the same
commands with the tiny preset on CPU, to check them against the current code without a GPU.
"""

import argparse
import os
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = {
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
    "mistral7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, sliding_window=None),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def _stub_omegaconf():
    try:
        import omegaconf  # noqa: F401
    except ImportError:  # nvembed.config imports it at module level; the dataclasses used here do not need it
        mod = types.ModuleType("omegaconf")
        mod.DictConfig = mod.ListConfig = mod.OmegaConf = type("Stub", (), {})
        err = types.ModuleType("omegaconf.errors")
        err.ConfigKeyError = err.OmegaConfBaseException = err.ValidationError = type("StubError", (Exception,), {})
        mod.errors = err
        sys.modules["omegaconf"], sys.modules["omegaconf.errors"] = mod, err
        print("[gpu_check] omegaconf missing: using a stub", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=32, help="queries per step (each with 1 positive + 1 negative)")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora", action="store_true", help="LoRA r16 (default for mistral7b); else full fine-tuning")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0, help="override the bf16 dense peak")
    ap.add_argument("--zero", type=int, default=0, choices=(0, 2, 3),
                    help="DeepSpeed ZeRO stage through nvembed's trainer path (bf16 engine on GPU); launch with "
                         "accelerate launch --config_file recipes/accelerate/zero<N>.yaml --num_processes 1")
    args = ap.parse_args(argv)
    if args.zero and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        ap.error(f"--zero {args.zero} runs under "
                 f"accelerate launch --config_file recipes/accelerate/zero{args.zero}.yaml --num_processes 1")
    _stub_omegaconf()
    import torch

    from nvembed.config import LoraConfig, ModelConfig, PoolingConfig
    from nvembed.losses import InfoNCELoss
    from nvembed.model import build_embedder

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    lora = args.lora or args.preset == "mistral7b"
    cfg = ModelConfig(random_init=dict(PRESETS[args.preset]),
                      tokenizer=os.path.join(REPO, "recipes/assets/tiny-tokenizer"),
                      dtype="bfloat16" if lora else "float32", gradient_checkpointing=args.grad_ckpt,
                      pooling=PoolingConfig(mode="latent_attention", num_latents=512, num_heads=8),
                      lora=LoraConfig(enabled=lora, r=16, alpha=32, dropout=0.0))
    t0 = time.time()
    emb = None
    if cuda and not args.zero:
        try:  # random init on the GPU: seconds for 7B, where the CPU takes minutes of the device's time
            with torch.device(dev):
                emb = build_embedder(cfg, seed=0)
        except Exception as e:  # noqa: BLE001  the check goes on with the slow path, saying why
            print(f"[gpu_check] building on the GPU failed ({type(e).__name__}: {e}); building on CPU", flush=True)
            emb = None
            torch.cuda.empty_cache()
    if emb is None:
        emb = build_embedder(cfg, seed=0)
    # counted before DeepSpeed partitions the parameters (ZeRO-3 leaves empty tensors on the module)
    n_all = sum(p.numel() for n, p in emb.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    n_train = sum(p.numel() for p in emb.parameters() if p.requires_grad)
    if args.zero:  # the trainer's DeepSpeed path: engine built by accelerate, buckets/clipping filled from the stage
        from nvembed.config import StageConfig
        from nvembed.training import deepspeed_utils as ds_utils
        from nvembed.training.trainer import make_accelerator

        acc = make_accelerator("bf16" if cuda else "fp32")  # DeepSpeed bf16: bf16 weights, fp32 master copy
        st = StageConfig(batch_size=args.batch, learning_rate=1e-5, warmup_steps=0, lr_scheduler="constant")
        model, opt, sched = ds_utils.prepare_stage(acc, emb, st, total=args.warmup + args.steps)
        dev = acc.device
        assert ds_utils.zero_stage(acc) == args.zero, ds_utils.zero_stage(acc)
    else:
        emb = model = emb.to(dev)
        opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    emb.train()
    print(f"[gpu_check] {args.preset}: {n_all / 1e9:.2f}B non-embedding params, {n_train / 1e6:.1f}M trainable, "
          f"{'ZeRO-%d' % args.zero if args.zero else 'no ZeRO'}, built in {time.time() - t0:.0f}s on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    loss_fn = InfoNCELoss(0.02, True, False)
    vocab = emb.base_model.config.vocab_size
    B, L = args.batch, args.length
    g = torch.Generator(device="cpu").manual_seed(0)

    def feats(n):
        ids = torch.randint(0, vocab, (n, L), generator=g)
        mask = torch.ones(n, L, dtype=torch.long)
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "pool_mask": mask.to(dev)}

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        q, d = feats(B), feats(2 * B)
        if cuda:
            torch.cuda.synchronize()
        t = time.time()
        if args.zero:  # as Trainer.train_step: the engine clips and steps inside backward
            with acc.autocast():
                out = loss_fn(model(**q), model(**d), 2)
            acc.backward(out.loss)
            opt.step()
            sched.step()
        else:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = loss_fn(model(**q), model(**d), 2)
            out.loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.time() - t)
        print(f"[gpu_check] step {i + 1}: {time.time() - t:.2f}s loss {out.loss.item():.4f}", flush=True)
    times.sort()
    step = times[len(times) // 2]
    tokens = 3 * B * L
    tps = tokens / step
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops * 1e12 or next((v for k, v in PEAK.items() if k in name), 0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(f"[gpu_check] median step {step:.3f}s, {tps:,.0f} tokens/s, {3 * B / step:.1f} seq/s, peak mem {mem:.1f} GiB")
    if peak:
        print(f"[gpu_check] MFU (6N): {6 * n_all * tps / peak:.1%}" +
              (f"; (4N, LoRA: no weight grads for frozen weights): {4 * n_all * tps / peak:.1%}" if lora else "")
              + f"  [peak {peak / 1e12:.0f} TFLOP/s bf16 dense, {name}]")
    return {"tokens_per_s": tps, "step_s": step, "losses": losses, "mfu": 6 * n_all * tps / peak if peak else None,
            "non_embedding_params": n_all, "trainable_params": n_train}


if __name__ == "__main__":
    main()
