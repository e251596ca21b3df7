"""Multi-process CPU tests: cross-device negatives, GradCache, DeepSpeed ZeRO-2/3 (gloo, 2 processes).

Each test launches ``tests/dist_worker.py`` (or ``train/train.py``) in subprocesses; the worker compares against a
single-process reference over the whole batch computed in the same run. Whole file: about 5 minutes on 2 cores.
"""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
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


def _accelerate(config, *args, port=0):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
            "--main_process_port", str(29500 + os.getpid() % 1000 + port), *args]


def _torchrun(*args, port=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29600 + os.getpid() % 1000 + port), *args]


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


# ---- whole smoke runs (train/train.py): one uninterrupted ZeRO-3 run and one DDP run are shared by the tests below --
# LoRA dropout stays on (smoke.yaml) and stage 1's lengths are raised so that the two ranks' batches pad to different
# shapes: dropout then draws differently per rank and resuming needs each rank's own RNG state.
# length_buckets=1: ZeRO-3 always makes min(length_buckets, rows) calls while DDP makes as many as save padding, and
# each call draws its own dropout. Evaluation on (after each stage): under ZeRO-3 every rank must take part.
SMOKE = ["train/train.py", "--config-name=smoke", "logging.progress_bar=false", "model.length_buckets=1",
         "eval.enabled=true", "eval.suites=[ci.yaml]",
         "stage_defs.stage1.save_every=2", "stage_defs.stage1.query_max_length=256",
         "stage_defs.stage1.doc_max_length=256"]


def _steps(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    return [(r["stage"], r["step"], r["loss"], r["lr"]) for r in rows if r.get("event") == "step"]


def _assert_same_weights(a_dir, b_dir, atol):
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= atol, (k, float((a[k] - b[k]).abs().max()))


def _assert_same_run(ref_dir, got_dir, *, rel, lr_rel, atol, subs=("stage1/final", "stage2/final", "final")):
    """Same steps, per-step losses (relative ``rel``) and learning rates, and weights of ``subs`` within ``atol``."""
    ref, got = _steps(ref_dir), _steps(got_dir)
    assert [r[:2] for r in got] == [r[:2] for r in ref]
    for (_, _, la, lra), (_, _, lb, lrb) in zip(ref, got):
        assert lb == pytest.approx(la, rel=rel, abs=rel / 10) and lrb == pytest.approx(lra, rel=lr_rel)
    for sub in subs:
        _assert_same_weights(ref_dir / sub, got_dir / sub, atol=atol)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3") / "run"
    proc = _run(_accelerate("recipes/accelerate/zero3.yaml", *SMOKE, f"output_dir={out}"), None, timeout=300)
    assert "2 processes" in proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run(_torchrun(*SMOKE, f"output_dir={out}"), None)
    return out


def test_zero3_smoke_training_exports_full_weights(zero3_run):
    from safetensors.torch import load_file

    out = zero3_run
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
    ckpt = out / "stage1" / "checkpoint-4"
    assert (ckpt / "state.json").is_file() and (ckpt / "deepspeed").is_dir()
    stage_w = load_file(str(out / "stage1" / "final" / "model.safetensors"))
    trainable = {n: p.shape for n, p in emb.named_parameters() if p.requires_grad}
    assert set(stage_w) == set(trainable)
    assert all(tuple(stage_w[k].shape) == tuple(s) for k, s in trainable.items())


def test_zero3_matches_ddp(zero3_run, ddp_run):
    """ZeRO-3 and DDP (2 processes each, same recipe) are the same computation: per-step losses and learning rates
    agree, and so do the trained weights and the embeddings of the exported DIR/final (sentence-transformers).
    Measured: losses within 1e-7 relative, weights within 3e-7 and unit-norm embeddings within 5e-8 absolute (fp32
    reduction order). The tolerances are 30-100x that and far below what one wrong step does (an Adam step moves a weight
    by up to lr = 1e-3 here; different dropout draws alone moved the weights by 3e-3)."""
    ddp = ddp_run
    a = _steps(ddp)
    assert len(a) == 10
    # the schedule counts optimizer steps (linear, 1 warmup step, 6 steps; lr logged after the step)
    assert [r[3] for r in a[:6]] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4, 0.0])
    _assert_same_run(ddp, zero3_run, rel=1e-5, lr_rel=1e-6, atol=1e-5)

    from sentence_transformers import SentenceTransformer

    texts = ["what causes a fever", "insulin lowers blood sugar", "how many bones are in the hand"]
    e_ddp = SentenceTransformer(str(ddp / "final"), trust_remote_code=True, device="cpu").encode(texts)
    e_z3 = SentenceTransformer(str(zero3_run / "final"), trust_remote_code=True, device="cpu").encode(texts)
    assert abs(e_ddp).max() > 0.1
    assert abs(e_ddp - e_z3).max() <= 2e-6, abs(e_ddp - e_z3).max()
    # evaluation under ZeRO-3 (all ranks encode, rank 0 writes) measures what DDP's rank 0 measures
    for label in ("untrained", "after_stage1", "after_stage2"):
        a_eval = json.load(open(ddp / "eval" / f"{label}.json"))["average"]
        b_eval = json.load(open(zero3_run / "eval" / f"{label}.json"))["average"]
        assert a_eval.keys() == b_eval.keys() and b_eval == pytest.approx(a_eval, abs=1e-4), (label, a_eval, b_eval)


def _launch_and_kill(cmd, target):
    """Run ``cmd`` until ``target`` exists, then SIGKILL the launcher and every worker (torch elastic starts workers
    in their own sessions: a process-group kill would miss them)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if proc.poll() is None:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        for p in tree:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
    proc.wait()
    assert target.exists(), f"run never reached {target}"


def test_zero3_kill_and_resume_is_exact(zero3_run, tmp_path):
    """SIGKILL a ZeRO-3 run mid-stage-1 once a checkpoint is on disk, resume it, SIGKILL it again mid-stage-2, resume
    it to the end: every step's loss and lr and the final weights equal the uninterrupted run's (sharded model,
    optimizer and schedule from DeepSpeed's checkpoint, per-rank RNG from accelerate's, data position from the step)."""
    out = tmp_path / "killed"
    run = lambda *extra, port: _accelerate("recipes/accelerate/zero3.yaml", *SMOKE, f"output_dir={out}", *extra,  # noqa
                                           port=port)
    _launch_and_kill(run(port=1), out / "stage1" / "checkpoint-2" / "state.json")
    assert not (out / "stage1" / "final").exists(), "killed too late: stage 1 had finished"
    _launch_and_kill(run("resume=true", port=2), out / "stage2" / "checkpoint-2" / "state.json")
    assert (out / "stage1" / "final").exists() and not (out / "stage2" / "final").exists()
    proc = _run(run("resume=true", port=3), tmp_path, timeout=300)
    assert "stage1: already complete" in proc.stdout and "stage2: resumed from" in proc.stdout, proc.stdout
    _assert_same_run(zero3_run, out, rel=1e-6, lr_rel=1e-9, atol=1e-6)


# ---- two "nodes" on loopback through recipes/slurm/train.sbatch ----------------------------------------------------
# Slurm's srun stands in for: it starts its command once per node, concurrently, with that node's SLURM_NODEID (as
# `srun --ntasks-per-node=1` does); FAKE_SRUN_RECORD only records the command. scontrol names the nodes' addresses.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
printf '%s\n' "$@" > "$FAKE_SRUN_OUT/srun_args.txt"
[ -n "${FAKE_SRUN_RECORD:-}" ] && exit 0
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$FAKE_SRUN_OUT/node$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch(tmp_path, out, *extra, record=False, timeout=300):
    """Run recipes/slurm/train.sbatch as Slurm would on 2 nodes x 1 process, both "nodes" being this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_ID="4242",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=REPO, GPUS_PER_NODE="1",
               MAIN_PORT=str(_free_port()), FAKE_SRUN_OUT=str(tmp_path),
               # one process per node: torchrun leaves OMP threads unset; two processes x 2 threads on 2 cores is
               # twice as slow here (the single-node launch sets 1)
               OMP_NUM_THREADS="1")
    if record:
        env["FAKE_SRUN_RECORD"] = "1"
    overrides = [a for a in SMOKE if "=" in a and not a.startswith("--")] + list(extra)
    proc = subprocess.Popen(["bash", "recipes/slurm/train.sbatch", "smoke", str(out), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        for p in tree:
            p.send_signal(signal.SIGKILL)
        raise
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    nodes = [(tmp_path / f"node{i}.log").read_text() for i in range(2) if (tmp_path / f"node{i}.log").exists()]
    assert proc.returncode == 0, f"sbatch script failed ({proc.returncode}):\n{log[-3000:]}\n" + \
        "\n".join(f"--- node {i}:\n{n[-6000:]}" for i, n in enumerate(nodes))
    return log, args, nodes


def test_zero3_two_nodes_via_slurm_script_matches_one_node(zero3_run, tmp_path):
    """2 nodes x 1 process (two `accelerate launch --num_machines 2 --machine_rank 0|1` started concurrently by
    recipes/slurm/train.sbatch, rendezvous on 127.0.0.1, gloo) == 1 node x 2 processes (zero3_run): same per-step
    losses and learning rates, same stage and final weights (measured: within 5e-7; the single-node launch reduces
    through DeepSpeed's shared-memory op, the two-node one through gloo). Each process writes its own files under its
    global rank (RNG state, ZeRO shard) and only node 0's main process writes the run folder and prints. Submitted
    again on the finished folder, as a requeued job would be, the script adds resume=true."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    # evaluation off (7 s here; it does not touch training: the stages reseed): ZeRO-3 evaluation is checked above
    log, args, nodes = _sbatch(tmp_path, out, "eval.enabled=false")
    assert "nodes=2 processes_per_node=1" in log, log
    assert args[args.index("--num_machines") + 1] == "2" and args[args.index("--num_processes") + 1] == "2", args
    assert "resume=true" not in args
    assert len(nodes) == 2 and "[nvembed]" in nodes[0] and "[nvembed]" not in nodes[1], nodes[1][-3000:]
    _assert_same_run(zero3_run, out, rel=1e-5, lr_rel=1e-6, atol=1e-5)
    ds = out / "stage1" / "checkpoint-4" / "deepspeed"
    assert {p.name for p in ds.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert len(list(ds.glob("pytorch_model/zero_pp_rank_[01]_mp_rank_00_optim_states.pt"))) == 2

    log, args, _ = _sbatch(tmp_path, out, "eval.enabled=false", record=True)
    assert "resuming it" in log and "resume=true" in args and f"output_dir={out}" in args, (log, args)


def test_ddp_kill_and_resume_is_exact(ddp_run, tmp_path):
    """The same under DDP (torchrun): each rank gets back its own RNG state from the checkpoint's rng.json."""
    out = tmp_path / "killed"
    run = lambda *extra, port: _torchrun(*SMOKE, f"output_dir={out}", *extra, port=port)  # noqa: E731
    _launch_and_kill(run(port=1), out / "stage1" / "checkpoint-2" / "state.json")
    assert not (out / "stage1" / "final").exists(), "killed too late: stage 1 had finished"
    proc = _run(run("resume=true", port=2), tmp_path)
    assert "stage1: resumed from" in proc.stdout, proc.stdout
    _assert_same_run(ddp_run, out, rel=1e-6, lr_rel=1e-9, atol=1e-6)


def _can_build_cpu_adam():
    from torch.utils.cpp_extension import is_ninja_available

    return bool(shutil.which("c++") or shutil.which("g++")) and is_ninja_available()


@pytest.mark.skipif(not _can_build_cpu_adam(), reason="ZeRO-Offload needs DeepSpeed's CPU Adam, built on first use "
                    "with a C++ compiler and ninja: none found")
def test_zero3_offload_matches_ddp(ddp_run, tmp_path):
    """zero3_offload.yaml (parameters and optimizer state in CPU RAM; accelerate swaps AdamW for DeepSpeedCPUAdam) on
    CPU: the same steps and weights as DDP. The first run builds cpu_adam (~75 s on 2 cores, then cached in
    ~/.cache/torch_extensions). Measured against DDP: losses within 8e-7 relative, weights within 5e-7."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "offload"
    _run(_accelerate("recipes/accelerate/zero3_offload.yaml", *SMOKE, f"output_dir={out}", "export_final=false"),
         tmp_path, timeout=480)
    _assert_same_run(ddp_run, out, rel=1e-5, lr_rel=1e-6, atol=1e-5, subs=("stage1/final", "stage2/final"))


def test_zero3_refuses_compile_before_writing(tmp_path):
    """model.compile under ZeRO-3 stops at once with an error naming the key, and writes nothing."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    proc = subprocess.run(_accelerate("recipes/accelerate/zero3.yaml", *SMOKE, f"output_dir={out}",
                                      "model.compile=true", port=7),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "config error: 'model.compile=true' does not work with DeepSpeed ZeRO-3" in proc.stderr
    assert not out.exists()


def test_gpu_check_runs_against_current_code():
    """scripts/gpu_check.py (the GPU check's measuring part) on CPU with the tiny preset, in-process: full fine-tuning
    and LoRA steps run through nvembed's current model, loss and config API and report consistent throughput. Its
    ZeRO-3 step and the shell script are run by `scripts/gpu_check.sh --dry` (not here: three launches, ~50 s)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "scripts", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    small = ["--preset", "tiny", "--batch", "2", "--length", "16"]
    t0 = time.time()
    # full: 1 warm-up + 2 timed steps, with a peak given so MFU is computed on CPU too
    full = gpu_check.main(small + ["--steps", "2", "--warmup", "1", "--peak-tflops", "1000"])
    full_wall = time.time() - t0
    lora = gpu_check.main(small + ["--steps", "1", "--warmup", "0", "--lora", "--grad-ckpt"])
    for r, n_steps in ((full, 3), (lora, 1)):
        assert len(r["losses"]) == n_steps and all(0 < x < 100 for x in r["losses"]), r  # warm-up + timed steps
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), r
    assert 0 < full["step_s"] < full_wall, (full, full_wall)  # one step in seconds, within the run's wall time
    assert 0 < full["mfu"] <= 1, full
    assert lora["mfu"] is None  # no peak given, none known on CPU
    assert lora["non_embedding_params"] == full["non_embedding_params"]
    # LoRA: backbone frozen; only adapters and the latent-attention head (most of the tiny model's trainables) learn
    assert 0 < lora["trainable_params"] < full["trainable_params"], (lora, full)
