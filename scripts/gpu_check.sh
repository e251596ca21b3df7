#!/usr/bin/env bash
# One-GPU check (< 10 min, one command): bf16 training steps of nvembed's embedder on random-init backbones, no
# downloads; prints tokens/s and MFU per step. Needs torch/transformers/peft (no hydra/datasets/wandb); the ZeRO step
# also needs deepspeed + accelerate and is skipped (said so) without them. Run from anywhere.
#   scripts/gpu_check.sh         # on the GPU machine
#   scripts/gpu_check.sh --dry   # the same commands with a tiny model on CPU: checks them against the current code
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON=${PYTHON:-python}
small=()
if [ "${1:-}" = "--dry" ]; then
    # later flags win in argparse: every step keeps its own options but runs the tiny preset, one short step
    small=(--preset tiny --batch 2 --length 32 --steps 1 --warmup 1)
    export DS_ACCELERATOR=cpu
else
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
fi
"$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "safetensors", "numpy") if importlib.util.find_spec(m) is None]
print("[gpu_check] missing:", missing or "none"); sys.exit(1 if missing else 0)
PY
# ~1.1B Llama shape, full fine-tuning (fp32 master weights, bf16 autocast), 32 queries x (1 pos + 1 neg) x 256 tokens
timeout 200 "$PYTHON" scripts/gpu_check.py --preset 1b --batch 32 --length 256 --steps 6 --warmup 2 "${small[@]}"
# Mistral-7B shape (bf16 weights) + LoRA r16, gradient checkpointing, 16 x 3 x 512 tokens
timeout 200 "$PYTHON" scripts/gpu_check.py --preset mistral7b --batch 16 --length 512 --steps 4 --warmup 1 --grad-ckpt --lora \
    "${small[@]}"
# the 1.1B model through nvembed's DeepSpeed path: ZeRO-3 engine in bf16 (bf16 weights, fp32 master copy), 1 process
if "$PYTHON" -c "import deepspeed, accelerate" 2>/dev/null; then
    timeout 150 "$PYTHON" -m accelerate.commands.launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 \
        --main_process_port 0 scripts/gpu_check.py --zero 3 --preset 1b --batch 16 --length 256 --steps 4 --warmup 1 \
        "${small[@]}"
else
    echo "[gpu_check] ZeRO step skipped: deepspeed or accelerate not installed"
fi
echo "[gpu_check] done"
