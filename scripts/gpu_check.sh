#!/usr/bin/env bash
# One-GPU check (< 8 min): bf16 training steps of nvembed's embedder, random-init backbones, no downloads.
# Needs torch/transformers/peft (no deepspeed/hydra/datasets/wandb). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "safetensors", "numpy") if importlib.util.find_spec(m) is None]
print("[gpu_check] missing:", missing or "none"); sys.exit(1 if missing else 0)
PY
# ~1.1B Llama shape, full fine-tuning (fp32 master weights, bf16 autocast), 32 queries x (1 pos + 1 neg) x 256 tokens
timeout 240 python scripts/gpu_check.py --preset 1b --batch 32 --length 256 --steps 6 --warmup 2
# Mistral-7B shape (bf16 weights) + LoRA r16, gradient checkpointing, 16 x 3 x 512 tokens
timeout 200 python scripts/gpu_check.py --preset mistral7b --batch 16 --length 512 --steps 4 --warmup 1 --grad-ckpt
