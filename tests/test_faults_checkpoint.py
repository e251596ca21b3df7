"""Checkpoint and resume faults (issue #14): broken checkpoints, a changed config on resume, non-finite losses and
their recovery, a torn metrics line, a full disk. Each fault is produced for real (truncated files, a tmpfs that
fills up, a learning rate that makes the losses overflow) and each test checks the message, the exit code or
exception, and that nothing already written changed."""

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_config
from nvembed.cli import train_main
from nvembed.errors import EXIT_USER_ERROR
from nvembed.training import checkpoint as ckpt

QUIET = ["logging.progress_bar=false", "export_final=false", "stages=[stage1]", "stage_defs.stage1.batch_size=2",
         "stage_defs.stage1.query_max_length=16", "stage_defs.stage1.doc_max_length=24",
         "stage_defs.stage1.datasets=[demo/medquad.yaml]"]  # small and quick: the faults do not need more
BASE = ["stage_defs.stage1.max_steps=3", "stage_defs.stage1.save_every=1", "keep_last=0"]


def _train(out, *extra):
    return train_main(["--config-name=smoke", f"output_dir={out}", *QUIET, *extra])


def _refused(capsys, out, *extra) -> str:
    """Run train_main expecting a user error: exit code 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as e:
        _train(out, *extra)
    assert e.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("nvembed: ")]
    assert line, err
    return line[-1]


def _hashes(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs}


def _steps(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    return [r for r in rows if r.get("event") == "step"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One finished stage-1 run with a checkpoint after every step (kept), shared by the tests: they copy it."""
    out = tmp_path_factory.mktemp("faults") / "base"
    _train(out, *BASE)
    assert [os.path.basename(c) for c in ckpt.checkpoints(str(out / "stage1"))] == \
        ["checkpoint-1", "checkpoint-2"]
    return out


def _copy(base_run, tmp_path, without_final=True):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    if without_final:  # as if killed after checkpoint-2: resume must come from the checkpoints
        shutil.rmtree(out / "stage1" / "final")
    return out


# ---- 1. manifest -----------------------------------------------------------------------------------------------------
def _truncate_weights(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


BREAKS = {
    "truncated weights": (_truncate_weights, "model.safetensors has"),
    "missing optimizer.pt": (lambda f: os.remove(os.path.join(f, "optimizer.pt")), "optimizer.pt is missing"),
    "missing manifest": (lambda f: os.remove(os.path.join(f, ckpt.MANIFEST)), "no manifest.json"),
}


def test_every_saved_folder_has_a_verified_manifest(base_run):
    stage = base_run / "stage1"
    for folder in [*ckpt.checkpoints(str(stage)), str(stage / "final")]:
        listed = json.load(open(os.path.join(folder, ckpt.MANIFEST)))["files"]
        assert set(listed) == set(os.listdir(folder)) - {ckpt.MANIFEST}, folder
        assert ckpt.verify(folder) is None
    assert {"optimizer.pt", "scheduler.pt", "rng.json"} <= set(json.load(open(stage / "checkpoint-2" / ckpt.MANIFEST))["files"])


def test_large_files_are_checked_by_size_only(base_run, tmp_path, monkeypatch):
    """Files over HASH_MAX_BYTES are not read back to hash them (multi-GB optimizer states): a torn write is still
    caught by its size, a same-size change is not (the price of not reading gigabytes on every save)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt.checkpoints(str(base_run / "stage1"))[-1], folder)
    monkeypatch.setattr(ckpt, "HASH_MAX_BYTES", os.path.getsize(folder / "optimizer.pt") - 1)
    ckpt.write_manifest(str(folder))
    files = json.load(open(folder / ckpt.MANIFEST))["files"]
    assert files["optimizer.pt"]["sha256"] is None and files[ckpt.STATE]["sha256"]
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert ckpt.verify(str(folder)) is None
    (folder / "optimizer.pt").write_bytes(data[:-8])
    assert "truncated" in ckpt.verify(str(folder))
    (folder / "optimizer.pt").write_bytes(data)
    (folder / ckpt.STATE).write_text((folder / ckpt.STATE).read_text().replace("1", "2", 1))
    assert "sha256" in ckpt.verify(str(folder))


@pytest.mark.parametrize("kind", list(BREAKS))
def test_broken_newest_checkpoint_is_named_and_skipped(base_run, tmp_path, capsys, kind):
    out = _copy(base_run, tmp_path)
    newest = out / "stage1" / "checkpoint-2"
    breaker, why = BREAKS[kind]
    breaker(str(newest))
    before = _hashes(out)
    assert ckpt.find_resume_point(str(out / "stage1")) == str(out / "stage1" / "checkpoint-1")
    err = capsys.readouterr().err
    assert f"{newest} is not a complete checkpoint: {why}" in err and "resuming from" in err
    assert _hashes(out) == before


def test_resume_skips_a_truncated_checkpoint_and_a_torn_metrics_line_exactly(base_run, tmp_path, capsys):
    """End to end: the broken checkpoint-2 is skipped, the torn last metrics row dropped, and the resumed run ends
    with the same losses and weights as the uninterrupted one (steps 2 and 3 run again from checkpoint-1)."""
    out = _copy(base_run, tmp_path)
    _truncate_weights(out / "stage1" / "checkpoint-2")
    metrics = out / "metrics.jsonl"
    text = open(metrics).read()
    n_lines = text.count("\n")
    with open(metrics, "a") as f:
        f.write('{"event": "step", "stage": "stage1", "ste')  # a write cut short by a kill
    keep = _hashes(out / "stage1" / "checkpoint-1")
    _train(out, *BASE, "resume=true")
    err = capsys.readouterr().err
    assert f"{metrics} line {n_lines + 1} is torn" in err
    assert "checkpoint-2 is not a complete checkpoint: model.safetensors has" in err
    ref, got = _steps(base_run), _steps(out)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    a = load_file(str(base_run / "stage1" / "final" / "model.safetensors"))
    b = load_file(str(out / "stage1" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert _hashes(out / "stage1" / "checkpoint-1") == keep
    assert ckpt.verify(str(out / "stage1" / "checkpoint-2")) is None  # re-saved complete


def test_no_complete_checkpoint_is_a_clear_error(base_run, tmp_path, capsys):
    out = _copy(base_run, tmp_path, without_final=False)
    broken = {"checkpoint-1": "missing optimizer.pt", "checkpoint-2": "truncated weights", "final": "missing manifest"}
    for folder, kind in broken.items():
        BREAKS[kind][0](str(out / "stage1" / folder))
    before = _hashes(out)
    line = _refused(capsys, out, *BASE, "resume=true")
    assert line.startswith(f"nvembed: run folder error: resume=true but no saved state in {out / 'stage1'} is complete")
    for folder, kind in broken.items():
        assert f"{out / 'stage1' / folder}: {BREAKS[kind][1]}" in line
    assert _hashes(out) == before


def test_a_bad_metrics_line_before_the_end_is_an_error_naming_it(tmp_path):
    from nvembed.config import LoggingConfig
    from nvembed.training.tracking import Tracker

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "step", "stage": "s", "step": 1}\n{"event": "st\n{"event": "step", "stage": "s", '
                    '"step": 2}\n')
    before = _hashes(tmp_path)
    with pytest.raises(ckpt.RunDirError, match=f"{path} line 2 is not JSON"):
        Tracker(str(tmp_path), LoggingConfig(wandb=False, tensorboard=False), {}, resume_after={"s": 1})
    assert _hashes(tmp_path) == before


# ---- 2. a different config on resume ---------------------------------------------------------------------------------
def test_resume_with_a_different_config_is_refused_before_anything_is_written(base_run, tmp_path, capsys):
    out = _copy(base_run, tmp_path, without_final=False)
    before = _hashes(out)
    line = _refused(capsys, out, *BASE, "resume=true", "seed=7", "stage_defs.stage1.learning_rate=0.01",
                    "logging.log_every=2")
    assert line.startswith("nvembed: config error: resume=true with a config that differs from")
    assert "seed: 42 -> 7" in line and "stage_defs.stage1.learning_rate: 0.001 -> 0.01" in line
    assert "log_every" not in line  # allowed: it cannot change the result
    assert "resume_changes=[KEY,...]" in line  # the learning rate may be opted in
    line = _refused(capsys, out, *BASE, "resume=true", "seed=7", "resume_changes=[seed]")
    assert "resume_changes names seed" in line
    assert _hashes(out) == before


def test_keys_that_cannot_change_the_result_are_allowed_and_listed(base_run, tmp_path, capsys):
    out = _copy(base_run, tmp_path, without_final=False)
    weights = _hashes(out / "stage1")
    _train(out, *BASE[:2], "keep_last=3", "resume=true", "logging.log_every=2", "max_bad_steps=9")
    logged = capsys.readouterr().out
    for shown in ("resume: keep_last: 0 -> 3 (does not change the result)", "resume: logging.log_every: 1 -> 2",
                  "resume: max_bad_steps: 5 -> 9"):
        assert shown in logged
    assert _hashes(out / "stage1") == weights  # the finished stage was not redone


# ---- 3. divergence: nothing saved after it, recovery with a lower learning rate ------------------------------------
def test_divergence_keeps_the_good_checkpoint_and_resume_with_a_lower_lr_recovers(tmp_path, capsys):
    """A learning rate of 1e12 (after one warm-up step at 0) makes the weights explode at step 2; the loss of step 3
    would still be finite, NaN after. keep_last=1 and a checkpoint every step: before the fix the exploded
    checkpoints pushed the good one out. Then the resume line from the error, as printed, recovers the run."""
    out = tmp_path / "run"
    run = ["stage_defs.stage1.max_steps=4", "stage_defs.stage1.save_every=1", "keep_last=1",
           "stage_defs.stage1.warmup_steps=1"]
    line = _refused(capsys, out, *run, "stage_defs.stage1.learning_rate=1e12")
    stage = out / "stage1"
    assert line.startswith("nvembed: training error: stage1: the trainable weights exploded at step 2 (norm ")
    assert f"The last good checkpoint is {stage / 'checkpoint-1'}." in line
    assert sorted(os.listdir(stage)) == ["checkpoint-1"]
    fix = line.split("Continue with a lower learning rate: ")[1].split(" (the learning rate")[0].split()
    assert fix == ["resume=true", "stage_defs.stage1.learning_rate=1e+11",
                   "resume_changes=[stage_defs.stage1.learning_rate]"]
    good = _hashes(stage / "checkpoint-1")
    # a changed learning rate without the opt-in is refused, nothing written
    assert "resume_changes=[KEY,...]" in _refused(capsys, out, *run, "resume=true",
                                                  "stage_defs.stage1.learning_rate=1e-3")
    assert _hashes(stage / "checkpoint-1") == good
    _train(out, *run, fix[0], "stage_defs.stage1.learning_rate=1e-3", fix[2])
    assert "learning rate 0.001 (weight decay 0) from the config in force from step 2" in capsys.readouterr().out
    rows = _steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # linear schedule after 1 warm-up step over 4 steps: factor (4 - k) / 3 after step k, on the new peak
    assert [r["lr"] for r in rows] == pytest.approx([1e12, 1e-3 * 2 / 3, 1e-3 / 3, 0.0], rel=1e-6)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert ckpt.verify(str(stage / "final")) is None
    w = load_file(str(stage / "final" / "model.safetensors"))
    assert {k: float(t.abs().max()) for k, t in w.items() if not t.abs().max() < 100} == {}


def test_no_checkpoint_is_saved_during_a_non_finite_streak(tmp_path, capsys):
    """Weights exploded twice give inf/NaN losses: the checkpoint due at step 4 falls in the streak and is not saved
    (it used to be, with the very weights that give the NaNs); max_bad_steps stops the run with the way back."""
    out = tmp_path / "run"
    line = _refused(capsys, out, "stage_defs.stage1.max_steps=6", "stage_defs.stage1.save_every=4",
                    "max_bad_steps=2", "stage_defs.stage1.warmup_steps=1", "stage_defs.stage1.learning_rate=1e12")
    assert re.match(r"nvembed: training error: stage1: 2 non-finite losses in a row up to step [45] "
                    r"\(max_bad_steps=2\), no checkpoint saved during them; stopped\. stage1 has no good checkpoint: "
                    r"it restarts from its beginning\. Continue with a lower learning rate: resume=true ", line), line
    assert not os.path.exists(out / "stage1") or ckpt.checkpoints(str(out / "stage1")) == []
    assert [r["step"] for r in _steps(out)] in ([1, 2], [1, 2, 3])  # the skipped steps log no row


# ---- 5. disk full -------------------------------------------------------------------------------------------------
def _tiny_save_args():
    from nvembed.model import build_embedder

    emb = build_embedder(tiny_model_config(), seed=0)
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-3)
    return emb, opt


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB tmpfs (needs root and mount; else skipped: the probe test below still runs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_mid_save_on_a_real_small_fs(small_fs, monkeypatch):
    emb, opt = _tiny_save_args()
    stage = small_fs / "stage1"
    ckpt.save_checkpoint(str(stage / "checkpoint-1"), embedder=emb, optimizer=opt, scheduler=None,
                         state={"step": 1, "global_step": 1})
    before = _hashes(stage)
    size = sum(os.path.getsize(os.path.join(stage, "checkpoint-1", f)) for f in os.listdir(stage / "checkpoint-1"))
    free = shutil.disk_usage(small_fs).free
    with open(small_fs / "filler", "wb") as f:  # leave room for about half a checkpoint
        f.write(b"\0" * (free - size // 2))
    # the pre-check refuses (nothing written) ...
    with pytest.raises(ckpt.DiskFullError, match=r"no space left on device to save .*checkpoint-2: it needs about"):
        ckpt.save_checkpoint(str(stage / "checkpoint-2"), embedder=emb, optimizer=opt, scheduler=None,
                             state={"step": 2, "global_step": 2})
    assert sorted(os.listdir(stage)) == ["checkpoint-1"]
    # ... and when the probe over-reports (another writer filled the disk since), the real ENOSPC is translated
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 2**40)
    with pytest.raises(ckpt.DiskFullError) as e:
        ckpt.save_checkpoint(str(stage / "checkpoint-2"), embedder=emb, optimizer=opt, scheduler=None,
                             state={"step": 2, "global_step": 2})
    assert str(e.value).startswith(f"no space left on device while saving {stage / 'checkpoint-2'}: it needs about")
    assert "Older checkpoints are intact" in str(e.value)
    assert sorted(os.listdir(stage)) == ["checkpoint-1"]  # temporary folder removed
    assert _hashes(stage) == before and ckpt.verify(str(stage / "checkpoint-1")) is None


def test_disk_full_pre_check_in_a_training_run(tmp_path, capsys, monkeypatch):
    """Through the trainer and the CLI: the free-space probe reports too little when checkpoint-2 is due."""
    out = tmp_path / "run"
    real = ckpt.free_bytes
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 1000 if os.path.exists(os.path.join(
        path, "checkpoint-1")) else real(path))
    line = _refused(capsys, out, *BASE)
    assert line.startswith(f"nvembed: disk error: no space left on device to save {out / 'stage1' / 'checkpoint-2'}")
    assert "has 0.0 MiB free" in line and "it needs about" in line
    assert sorted(os.listdir(out / "stage1")) == ["checkpoint-1"]
    assert ckpt.verify(str(out / "stage1" / "checkpoint-1")) is None


# ---- 6. DeepSpeed shards are read without running code ---------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint file can do to an unpickler that allows it
        return open, (self.marker, "w")


def test_deepspeed_shards_are_read_without_running_code(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from nvembed.training.deepspeed_utils import SafeCheckpointEngine

    engine = SafeCheckpointEngine(TorchCheckpointEngine())
    marker = tmp_path / "code-ran"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.RunDirError, match=f"cannot load DeepSpeed checkpoint file {tmp_path / 'evil.pt'} safely"):
        engine.load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    # DeepSpeed's own bookkeeping types are allowed (the resume tests in test_distributed.py load real shards)
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(2.0), "w": torch.ones(2)},
               tmp_path / "ok.pt")
    got = engine.load(str(tmp_path / "ok.pt"))
    assert got["zero_stage"] == ZeroStageEnum.weights and got["loss_scaler"].cur_scale == 2.0
