"""The ablation harness end to end on the smoke recipe: real sweeps, real exports, real suite evaluation."""

from __future__ import annotations

import json
import os

import pytest

from nvembed.eval.ablate import aggregate, format_table, groups, run, setting_name
from nvembed.eval.experiment import ExperimentError, load_recipe

CI_SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_specs", "eval", "ci.yaml")


def test_groups_follow_the_recipe():
    demo = load_recipe("demo", [])
    g = groups(demo)
    assert g["pooling_attention"] == {"model.pooling.mode": "latent_attention,mean,last_token",
                                      "model.bidirectional": "true,false"}
    assert g["stage2_in_batch"] == {"stage_defs.stage2.in_batch_negatives": "true"}
    # equal compute: one stage runs as many steps as both stages of the recipe (here 30 + 20)
    sized = groups(load_recipe("demo", ["stage_defs.stage1.max_steps=30", "stage_defs.stage2.max_steps=20"]))
    assert sized["one_stage"] == {"stages": "[stage1]", "stage_defs.stage1.max_steps": "50"}
    # the paper's single stage: the blend of stage 2 alone, in-batch negatives on and off
    assert sized["single_stage"] == {"stages": "[stage2]", "stage_defs.stage2.max_steps": "50",
                                     "stage_defs.stage2.in_batch_negatives": "true,false"}
    assert g["zero_init_residual"] == {"model.pooling.zero_init_residual": "false"}


def test_aggregate_mean_and_sample_std():
    def res(avg):
        return {"average": {"all": avg, "retrieval": avg}, "tasks": {"med": {"main_score": avg}}}

    rows = [{"group": "g", "setting": "reference", "seed": s, "result": res(v)} for s, v in [(1, 0.5), (2, 0.7)]]
    rows += [{"group": "g", "setting": "mean", "seed": 1, "result": res(0.4)}]
    lines = {ln["setting"]: ln for ln in aggregate(rows)}
    m, sd = lines["reference"]["all"]
    assert m == pytest.approx(60.0) and sd == pytest.approx(14.1421356, rel=1e-6)
    assert lines["mean"]["all"] == (pytest.approx(40.0), 0.0)
    table = format_table(list(lines.values()))
    assert "| g | mean | 1 | 40.00 ± 0.00 | -20.00 |" in table


def test_setting_names():
    d = {"model.pooling.mode": "latent_attention", "model.bidirectional": "true"}
    assert setting_name({"model.pooling.mode": "latent_attention", "model.bidirectional": "true", "seed": "1"},
                        d) == "reference"
    assert setting_name({"model.pooling.mode": "mean", "model.bidirectional": "false", "seed": "2"}, d) == "mode=mean+causal"
    # a swept bool comes back from Hydra as True/False
    assert setting_name({"model.pooling.mode": "latent_attention", "model.bidirectional": "True"}, d) == "reference"
    assert setting_name({"model.pooling.mode": "mean", "model.bidirectional": "False"}, d) == "mode=mean+causal"
    assert setting_name({"stages": "[stage1]", "stage_defs.stage1.max_steps": "90"}, d) == "one stage (stage1)+max_steps=90"
    single = {**d, "stages": "[stage1, stage2]", "stage_defs.stage2.in_batch_negatives": "false"}
    assert setting_name({"stages": "[stage2]", "stage_defs.stage2.in_batch_negatives": "True"},
                        single) == "one stage (stage2)+in_batch_negatives=true"
    assert setting_name({"stages": "[stage2]", "stage_defs.stage2.in_batch_negatives": "False"},
                        single) == "one stage (stage2)"


def test_bad_requests_fail_before_training(tmp_path):
    with pytest.raises(ExperimentError, match="--groups: unknown"):
        run("smoke", str(tmp_path), seeds=[1], only=["nope"], suite=CI_SUITE)
    with pytest.raises(ExperimentError, match="--seeds"):
        run("smoke", str(tmp_path), seeds=[1, 1], suite=CI_SUITE)
    with pytest.raises(ExperimentError, match="--set 'seed=3'"):
        run("smoke", str(tmp_path), seeds=[1], suite=CI_SUITE, extra=["seed=3"])
    assert not any(tmp_path.iterdir())


def test_smoke_ablation_end_to_end(tmp_path):
    out = tmp_path / "abl"
    paths = run("smoke", str(out), seeds=[1, 2], only=["stage2_in_batch"], suite=CI_SUITE,
                extra=["stage_defs.stage1.max_steps=2", "stage_defs.stage2.max_steps=2"], log=lambda m: None)
    data = json.loads(open(paths["json"]).read())
    runs = data["runs"]
    assert sorted(r["seed"] for r in runs) == [1, 2]
    assert {r["setting"] for r in runs} == {"in_batch_negatives=true"}
    for r in runs:  # every run trained both stages and its export was evaluated on every task type
        assert os.path.isfile(os.path.join(r["run"], "final", "config.json"))
        assert set(r["average"]) >= {"all", "retrieval", "sts", "classification", "clustering"}
    (line,) = data["settings"]
    assert line["n"] == 2 and line["all"][1] >= 0
    assert os.path.getsize(paths["png"]) > 0
    # continuing changes nothing: finished runs are kept, evaluations read from their cache
    mtimes = {r["run"]: os.path.getmtime(os.path.join(r["run"], "ablation_eval.json")) for r in runs}
    again = run("smoke", str(out), seeds=[1, 2], only=["stage2_in_batch"], suite=CI_SUITE,
                extra=["stage_defs.stage1.max_steps=2", "stage_defs.stage2.max_steps=2"], log=lambda m: None,
                train=False)
    assert json.loads(open(again["json"]).read())["settings"] == data["settings"]
    assert all(os.path.getmtime(os.path.join(r, "ablation_eval.json")) == t for r, t in mtimes.items())
