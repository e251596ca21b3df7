"""W&B (offline) and TensorBoard, read back with their own readers, hold exactly what metrics.jsonl holds.

One smoke run through the CLI with both loggers on and a one-task evaluation, so the rows that come between two
stages (stage summary, evaluation) are exercised: they once pushed W&B's step past the next training step, which
W&B then dropped. And a resumed run: TensorBoard once kept the interrupted run's steps after the checkpoint too.
"""

import glob
import os
import shutil
import struct

import numpy as np
import pytest

from nvembed.cli import train_main
from nvembed.training.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wandb_history(run_file):
    """``{_step: {key: value}}`` from an offline ``run-*.wandb`` file: W&B's protobuf records in LevelDB-log framing
    (7-byte file header, 32 KiB blocks, 7-byte chunk headers), the format wandb-core writes and `wandb sync` reads."""
    from wandb.proto import wandb_internal_pb2 as pb

    import json

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", run_file
    history, i, buf = {}, 7, b""
    while i + 7 <= len(data):
        left = 32768 - i % 32768
        if left < 7:  # block trailer
            i += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if kind == 0:  # zero padding to the end of the block
            i += left
            continue
        buf, i = (buf if kind in (3, 4) else b"") + data[i + 7:i + 7 + n], i + 7 + n
        if kind in (1, 4):  # full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                items = {"/".join(it.nested_key) or it.key: json.loads(it.value_json) for it in rec.history.item}
                history[int(items["_step"])] = items
    return history


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logging")
    suite = tmp / "suite.yaml"  # one small STS task: enough to put eval rows between the stages
    suite.write_text(f"name: tiny\nseed: 0\nbatch_size: 16\ntasks:\n  - name: stsb\n    type: sts\n"
                     f"    path: {REPO}/data_specs/eval/sts/stsbenchmark-test.jsonl\n    max_pairs: 8\n")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp), "WANDB_CACHE_DIR": str(tmp / "c"),
           "WANDB_CONFIG_DIR": str(tmp / "c"), "WANDB_DATA_DIR": str(tmp / "c")}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    out = tmp / "run"
    try:
        train_main(["--config-name=smoke", f"output_dir={out}", "logging.wandb=true", "logging.tensorboard=true",
                    "logging.progress_bar=false", "export_final=false", "stage_defs.stage1.max_steps=2",
                    "stage_defs.stage2.max_steps=2", "stage_defs.stage1.save_every=0",
                    "stage_defs.stage2.save_every=0", "stage_defs.stage1.datasets=[demo/medquad.yaml]",
                    "stage_defs.stage2.datasets=[demo/stsb.yaml]", "eval.enabled=true", f"eval.suites=[{suite}]"])
    finally:
        mp.undo()
    return str(out)


def test_wandb_and_tensorboard_hold_every_logged_value(logged_run):
    rows = read_metrics(logged_run)
    steps = [r for r in rows if r["event"] == "step"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4]  # every step logged, both stages
    assert [r["label"] for r in evals] == ["untrained", "after_stage1", "after_stage2"]

    run_files = glob.glob(os.path.join(logged_run, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(run_files) == 1, run_files
    wb = wandb_history(run_files[0])
    tb = {tag: dict(pts) for tag, pts in tensorboard_scalars(os.path.join(logged_run, "tensorboard")).items()}

    for r in steps:
        key = f"{r['stage']}/loss"
        assert wb[r["global_step"]][key] == r["loss"], (key, r["global_step"])  # JSON doubles: exact
        assert tb[key][r["global_step"]] == np.float32(r["loss"])  # TensorBoard stores float32
    for r in evals:  # each evaluation at the step it was made, not shifted onto the next stage's first step
        assert wb[r["global_step"]]["run/eval/all"] == r["eval/all"], r["label"]
        assert tb["run/eval/all"][r["global_step"]] == np.float32(r["eval/all"])
    # nothing logged that metrics.jsonl does not hold
    assert sorted(wb) == [0, 1, 2, 3, 4]
    assert {s for s in tb["stage1/loss"]} | {s for s in tb["stage2/loss"]} == {1, 2, 3, 4}
    # the stage summary lands on the stage's last step in W&B
    summary = next(r for r in rows if r["event"] == "stage_summary" and r["stage"] == "stage1")
    assert wb[2]["stage1/last_loss"] == summary["last_loss"] == steps[1]["loss"]


def test_tensorboard_after_resume_holds_each_step_once(tmp_path):
    out = tmp_path / "run"
    argv = ["--config-name=smoke", f"output_dir={out}", "logging.wandb=false", "logging.tensorboard=true",
            "logging.progress_bar=false", "export_final=false", "stages=[stage1]", "stage_defs.stage1.max_steps=4",
            "stage_defs.stage1.save_every=2", "stage_defs.stage1.datasets=[demo/medquad.yaml]"]
    train_main(argv)
    # interrupted after step 4 was logged, before the stage's final save: the resume restarts from checkpoint-2
    shutil.rmtree(out / "stage1" / "final")
    train_main(argv + ["resume=true"])
    steps = [r for r in read_metrics(str(out)) if r["event"] == "step"]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4]
    tb = tensorboard_scalars(str(out / "tensorboard"))
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 2  # one file per process
    assert tb["stage1/loss"] == [(r["global_step"], np.float32(r["loss"])) for r in steps]
