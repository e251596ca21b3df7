"""Multi-process CPU tests: cross-device negatives, GradCache, DeepSpeed ZeRO-2/3 (gloo, 2 processes).

Each test launches ``tests/dist_worker.py`` (or ``train/train.py``) in subprocesses; the worker compares against a
single-process reference over the whole batch computed in the same run. Whole file: about 4 minutes on 2 cores.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "dist_worker.py")
TOL = 1e-4  # max |g - g_ref| / max |g_ref| per tensor, fp32

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "recipes", "smoke.yaml")), reason="no recipes")


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", MASTER_PORT=str(29500 + os.getpid() % 1000))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def _run(cmd, tmp_path, timeout=240):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _results(prefix):
    return [json.load(open(p)) for p in sorted(glob.glob(f"{prefix}.rank*.json"))]


def _accelerate(config, *args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
            "--main_process_port", str(29500 + os.getpid() % 1000), *args]


def test_gradcache_single_process_equals_plain(tmp_path):
    out = str(tmp_path / "single")
    _run([sys.executable, WORKER, "ddp", out], tmp_path)
    (r,) = _results(out)
    assert r["world"] == 1
    assert abs(r["plain_loss"] - r["ref_loss"]) < 1e-5
    assert abs(r["gc_loss"] - r["ref_loss"]) < 1e-5
    assert r["plain_grad_err"] < TOL and r["gc_grad_err"] < TOL


def test_cross_device_negatives_and_gradcache_ddp(tmp_path):
    """2 processes x half the batch (DDP, cross-device negatives) == 1 process x whole batch; GradCache too."""
    out = str(tmp_path / "ddp")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(29600 + os.getpid() % 1000), WORKER, "ddp", out], tmp_path)
    rows = _results(out)
    assert len(rows) == 2 and all(r["world"] == 2 for r in rows)
    for r in rows:
        assert abs(r["plain_loss"] - r["ref_loss"]) < 1e-5, r  # mean of the per-rank losses
        assert abs(r["gc_loss"] - r["ref_loss"]) < 1e-5, r
        assert r["plain_grad_err"] < TOL, r
        assert r["gc_grad_err"] < TOL, r


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_zero_gradcache(tmp_path, stage):
    """ZeRO-3: parameters really partitioned (half per rank). ZeRO-2/3: plain and GradCache gradients (2 ranks,
    cross-device negatives) == single-process reference; GradCache + LoRA + 2-step accumulation trains with exactly
    one engine step per optimizer step; gathered trainable weights have full shapes."""
    pytest.importorskip("deepspeed")
    out = str(tmp_path / f"z{stage}")
    _run(_accelerate(f"recipes/accelerate/zero{stage}.yaml", WORKER, "ds", out), tmp_path)
    rows = _results(out)
    assert len(rows) == 2
    for r in rows:
        assert r["zero_stage"] == stage
        assert abs(r["plain_loss"] - r["ref_loss"]) < 1e-5, r
        assert r["plain_grad_err"] < TOL, r
        assert abs(r["gc_loss"] - r["ref_loss"]) < 1e-5, r
        assert r["gc_grad_err"] < TOL, r
        assert r["gc_engine_steps"] == 1, r  # GradCache chunks: one engine step for the whole batch
        assert r["engine_steps_for_3_optimizer_steps"] == 3, r
        assert r["weights_changed"] and r["full_shapes"], r
        assert all(x == x for x in r["train_losses"]), r
        if stage == 3:
            assert r["n_partitioned"] > 0 and r["empty_local_params"] == r["n_partitioned"], r
            # each rank holds its half (+ at most one element of padding per tensor)
            assert abs(r["local_numel"] - r["full_numel"] / 2) <= r["n_partitioned"], r


def test_zero3_smoke_training_exports_full_weights(tmp_path):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = _run(_accelerate("recipes/accelerate/zero3.yaml", "train/train.py", "--config-name=smoke",
                            f"output_dir={out}"), tmp_path, timeout=300)
    assert "2 processes" in proc.stdout + proc.stderr
    final = out / "final"
    assert (final / "model.safetensors").is_file()
    weights = load_file(str(final / "model.safetensors"))
    assert weights and all(v.numel() > 0 for v in weights.values())

    sys.path.insert(0, REPO)
    from omegaconf import OmegaConf

    from nvembed.cli import finalize
    from nvembed.config import validate
    from nvembed.model import build_embedder

    raw = OmegaConf.load(os.path.join(REPO, "recipes", "smoke.yaml"))
    emb = build_embedder(finalize(validate(raw)).model)
    own = emb.state_dict()
    base = sum(v.numel() for k, v in own.items() if "lora_" not in k)
    assert sum(v.numel() for v in weights.values()) >= 0.9 * base  # full-size, not ZeRO-3 partitions
    # the stage checkpoints: sharded DeepSpeed state + full trainable weights, state.json last
    ckpt = out / "stage1" / "checkpoint-3"
    assert (ckpt / "state.json").is_file() and (ckpt / "deepspeed").is_dir()
    stage_w = load_file(str(out / "stage1" / "final" / "model.safetensors"))
    trainable = {n: p.shape for n, p in emb.named_parameters() if p.requires_grad}
    assert set(stage_w) == set(trainable)
    assert all(tuple(stage_w[k].shape) == tuple(s) for k, s in trainable.items())
