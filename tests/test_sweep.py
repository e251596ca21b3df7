"""Hydra sweeps (``train.py -m``): one run per combination in its own folder, a table over them, and a second
sweep into the same folder refused (or continued with resume=true). One 2 x 2 sweep of one-step smoke runs, shared."""

import json
import os
import shutil

import pytest

from nvembed.cli import train_main
from nvembed.training.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES, SEEDS = ["latent_attention", "mean"], ["1", "2"]
RUNS = [f"model.pooling.mode={m},seed={s}" for m in MODES for s in SEEDS]  # swept keys only, sorted


def sweep_argv(out, suite, *extra):
    return ["-m", "--config-name=smoke", f"output_dir={out}", f"model.pooling.mode={','.join(MODES)}",
            f"seed={','.join(SEEDS)}",
            # fixed for every run, so not in the folder names
            "stages=[stage1]", "stage_defs.stage1.max_steps=1", "stage_defs.stage1.save_every=0",
            "stage_defs.stage1.datasets=[demo/medquad.yaml]", "export_final=false", "logging.wandb=false",
            "logging.tensorboard=false", "logging.progress_bar=false", "eval.enabled=true",
            f"eval.suites=[{suite}]", *extra]


def snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    suite = tmp / "suite.yaml"  # one small STS task: the table's eval columns
    suite.write_text(f"name: tiny\nseed: 0\nbatch_size: 16\ntasks:\n  - name: stsb\n    type: sts\n"
                     f"    path: {REPO}/data_specs/eval/sts/stsbenchmark-test.jsonl\n    max_pairs: 8\n")
    out = tmp / "sweep"
    train_main(sweep_argv(out, suite))  # a failing run raises SystemExit
    return str(out), str(suite)


def test_one_run_per_combination_and_a_table(sweep):
    out, _ = sweep
    assert sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n))) == sorted(RUNS)
    table = json.load(open(os.path.join(out, "sweep.json")))["runs"]
    assert [r["run"] for r in table] == RUNS  # Hydra's launch order
    for row in table:
        run = os.path.join(out, row["run"])
        saved = open(os.path.join(run, "config.yaml")).read()
        mode, seed = row["overrides"]["model.pooling.mode"], row["overrides"]["seed"]
        assert row["overrides"] == {"model.pooling.mode": mode, "seed": seed}
        assert f"    mode: {mode}\n" in saved and f"\nseed: {seed}\n" in saved  # the run got its own values
        assert os.path.samefile(row["output_dir"], run)
        assert row["status"] == "complete"
        steps = [r for r in read_metrics(run) if r["event"] == "step"]
        assert len(steps) == 1 and row["final_loss"] == steps[-1]["loss"]
        results = json.load(open(os.path.join(run, "eval", "results.json")))
        assert row["eval_label"] == "after_stage1"
        assert row["eval"] == {"stsb": results["after_stage1"]["tasks"]["stsb"]["main_score"]}
        assert row["eval_avg"] == results["after_stage1"]["average"]["all"]
    md = open(os.path.join(out, "sweep.md")).read().splitlines()
    assert md[0] == "| model.pooling.mode | seed | status | final loss | stsb | eval avg |"
    for row, line in zip(table, md[2:]):
        mode, seed = row["overrides"]["model.pooling.mode"], row["overrides"]["seed"]
        assert line.startswith(f"| {mode} | {seed} | complete | {row['final_loss']:.4f} | "
                               f"{row['eval']['stsb'] * 100:.2f} |")
    assert len(md) == 2 + len(RUNS)


def test_same_sweep_again_is_refused_and_changes_nothing(sweep, capsys):
    out, suite = sweep
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train_main(sweep_argv(out, suite))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nvembed: run folder error: output_dir ")
    assert "already holds 4 of this sweep's 4 runs" in err[0] and "resume=true" in err[0]
    assert snapshot(out) == before  # multirun.yaml, sweep.json and every run untouched


def test_resume_continues_the_sweep_and_starts_missing_runs(sweep):
    out, suite = sweep
    gone = RUNS[-1]  # as if the sweep had been killed before its last run
    shutil.rmtree(os.path.join(out, gone))
    kept = {n: open(os.path.join(out, n, "metrics.jsonl")).read() for n in RUNS[:-1]}
    train_main(sweep_argv(out, suite, "resume=true"))
    for n, text in kept.items():  # finished runs: nothing trained again
        assert open(os.path.join(out, n, "metrics.jsonl")).read() == text
    assert [r["event"] for r in read_metrics(os.path.join(out, gone))].count("step") == 1
    table = json.load(open(os.path.join(out, "sweep.json")))["runs"]
    assert [(r["run"], r["status"]) for r in table] == [(n, "complete") for n in RUNS]
