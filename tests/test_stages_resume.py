"""Two-stage schedule, checkpoints, exact resume after SIGKILL, atomic saves, refusal to overwrite, NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

TRAIN = os.path.join(REPO, "train", "train.py")
# stage 1 only, enough steps to be killed in the middle; LoRA dropout on, so RNG restore matters
FAST = ["logging.progress_bar=false", "export_final=false"]


def _train(out, *extra, check=True, timeout=600):
    cmd = [sys.executable, TRAIN, "--config-name=smoke", f"output_dir={out}", *FAST, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _losses(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if r.get("event") == "step"]


def test_two_stage_run_layout(tmp_path):
    out = tmp_path / "run"
    _train(out, "export_final=true", "model.lora.dropout=0.0")
    for p in ("stage1/final", "stage2/final", "final", "metrics.jsonl", "config.yaml", "loss_curves.png"):
        assert (out / p).exists(), p
    st1 = json.load(open(out / "stage1" / "final" / "state.json"))
    st2 = json.load(open(out / "stage2" / "final" / "state.json"))
    assert st1["complete"] and st2["complete"] and st2["global_step"] == st1["global_step"] + st2["step"]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    summaries = [r for r in rows if r.get("event") == "stage_summary"]
    assert [s["stage"] for s in summaries] == ["stage1", "stage2"]
    steps = [r for r in rows if r.get("event") == "step"]
    assert {"loss", "lr", "grad_norm", "accuracy", "seq_per_s", "tok_per_s"} <= set(steps[0])
    # keep_last=2: stage1 saves every 3 of 6 steps -> checkpoint-3 only (the end is 'final')
    assert sorted(os.listdir(out / "stage1")) == ["checkpoint-3", "final"]
    # stage 2 alone, initialised from stage 1's final weights
    alone = tmp_path / "alone"
    _train(alone, "stages=[stage2]", f"init_from={out}/stage1/final", "model.lora.dropout=0.0")
    a = load_file(str(out / "stage2" / "final" / "model.safetensors"))
    b = load_file(str(alone / "stage2" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    # same start weights, same data, fresh optimizer, no dropout: the same stage-2 losses
    assert [x[2] for x in _losses(alone)] == pytest.approx([x[2] for x in _losses(out)[6:]], rel=1e-4)


def test_kill_and_resume_is_exact(tmp_path):
    ref = tmp_path / "ref"
    args = ["stages=[stage1]", "stage_defs.stage1.max_steps=10", "stage_defs.stage1.save_every=2"]
    _train(ref, *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, TRAIN, "--config-name=smoke", f"output_dir={out}", *FAST, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "stage1" / "checkpoint-4" / "state.json"
    deadline = time.time() + 300
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert target.exists(), "run never reached checkpoint-4"
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-stage
    proc.wait()
    assert not (out / "stage1" / "final").exists()
    # the same dir without resume is refused
    r = _train(out, *args, check=False)
    assert r.returncode != 0 and "resume=true" in (r.stderr + r.stdout)
    _train(out, *args, "resume=true")
    ref_l, got_l = _losses(ref), _losses(out)
    assert [x[:2] for x in got_l] == [x[:2] for x in ref_l]
    for (_, _, a), (_, _, b) in zip(ref_l, got_l):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    wa = load_file(str(ref / "stage1" / "final" / "model.safetensors"))
    wb = load_file(str(out / "stage1" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_refuses_to_overwrite_a_finished_run(tmp_path):
    out = tmp_path / "run"
    _train(out, "stages=[stage1]", "stage_defs.stage1.max_steps=2")
    before = {p: os.path.getmtime(os.path.join(d, p)) for d, _, fs in os.walk(out) for p in fs}
    r = _train(out, "stages=[stage1]", "stage_defs.stage1.max_steps=2", check=False)
    assert r.returncode != 0
    assert "already holds a run" in r.stderr + r.stdout and "resume=true" in r.stderr + r.stdout
    after = {p: os.path.getmtime(os.path.join(d, p)) for d, _, fs in os.walk(out) for p in fs}
    assert before == after


def test_atomic_save_survives_a_crash_while_saving(tmp_path, monkeypatch):
    from conftest import tiny_model_config
    from nvembed.model import build_embedder
    from nvembed.training import checkpoint as ckpt

    emb = build_embedder(tiny_model_config(), seed=0)
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-3)
    stage = tmp_path / "stage1"
    ckpt.save_checkpoint(str(stage / "checkpoint-2"), embedder=emb, optimizer=opt, scheduler=None,
                         state={"step": 2, "global_step": 2})
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            raise OSError("simulated crash while writing")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        next(p for p in emb.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(stage / "checkpoint-4"), embedder=emb, optimizer=opt, scheduler=None,
                             state={"step": 4, "global_step": 4})
    monkeypatch.setattr(torch, "save", real_save)
    assert [os.path.basename(p) for p in ckpt.checkpoints(str(stage))] == ["checkpoint-2"]
    fresh = build_embedder(tiny_model_config(), seed=0)
    state = ckpt.load_checkpoint(ckpt.checkpoints(str(stage))[-1], embedder=fresh, optimizer=None)
    assert state["step"] == 2
    ckpt.clean_temporaries(str(stage))
    assert sorted(os.listdir(stage)) == ["checkpoint-2"]


def test_non_finite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from nvembed.cli import finalize
    from nvembed.config import validate
    from nvembed.training import trainer as tr
    from nvembed.training.objective import ContrastiveObjective

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "recipes", "smoke.yaml")))
    raw.update(output_dir=str(tmp_path / "nan"), stages=["stage1"], export_final=False, max_bad_steps=3)
    raw["stage_defs"]["stage1"].update(max_steps=8, save_every=2)
    raw["logging"]["progress_bar"] = False
    cfg = finalize(validate(raw))
    real = ContrastiveObjective.loss
    calls = {"n": 0}

    def flaky(self, q, d, batch):
        out = real(self, q, d, batch)
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 5:  # one isolated NaN, then NaN forever
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ContrastiveObjective, "loss", flaky)
    with pytest.raises(tr.TrainingError, match="non-finite"):
        tr.Trainer(cfg, specs_root=os.path.join(REPO, "data_specs")).run()
    stage = tmp_path / "nan" / "stage1"
    assert (stage / "checkpoint-4" / "state.json").exists()  # last good checkpoint kept
    assert not (stage / "final").exists()
