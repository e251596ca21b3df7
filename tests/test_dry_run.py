"""dry_run=true / scripts/check_recipe.py (issue #13 item 4): config, every stage's specs and local sources checked
and counted without loading a model or writing anything; the paper recipes list only specs that can load, and say
why the others are left out."""

import glob
import json
import os
import subprocess
import sys

import datasets
import yaml

from conftest import REPO, launch


SPECS = os.path.join(REPO, "data_specs")


def table(out):
    """The dry-run table as dicts (the status, last, may contain spaces)."""
    lines = [line for line in out.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    head = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if line.startswith(("dry run:", "ERROR")):
            break
        cells = line.split(None, len(head) - 1)
        rows.append(dict(zip(head, cells)))
    return rows


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def test_smoke_dry_run_counts_every_local_dataset_and_loads_no_model(capsys, tmp_path):
    out_dir = tmp_path / "run"
    # an option after a key=value, and a tokenizer that does not exist: a launch would fail loading the model
    code, out, err = launch(capsys, f"output_dir={out_dir}", "--config-name=smoke", "dry_run=true",
                            "model.tokenizer=/nonexistent/tokenizer")
    assert code == 0, err
    rows = table(out)
    smoke = yaml.safe_load(open(os.path.join(REPO, "recipes", "smoke.yaml")))
    assert [(r["stage"], r["spec"]) for r in rows] == [(s, d) for s in smoke["stages"]
                                                       for d in smoke["stage_defs"][s]["datasets"]]
    for r in rows:
        spec = yaml.safe_load(open(os.path.join(SPECS, r["spec"])))
        assert r["status"] == "ok" and r["dataset"] == spec["name"] and r["task"] == spec["task"]
        assert int(r["rows"]) == _lines(os.path.join(SPECS, os.path.dirname(r["spec"]), spec["source"]["path"]))
        assert 0 < int(r["examples"]) <= 2 * int(r["rows"])  # sts: each kept pair gives two examples
    assert "nothing written" in out and not out_dir.exists()


def _hub_spec(tmp_path, name, hf):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\ntask: retrieval\ninstruction: find it\nsource: {{hf: {hf}}}\n"
                 f"fields: {{query: q, positive: p}}\n")
    return p


def test_dry_run_opens_local_sources_and_leaves_hub_ids_alone(capsys, tmp_path):
    ds = datasets.Dataset.from_dict({"q": [f"question {i}" for i in range(6)], "p": [f"answer {i}" for i in range(6)]})
    ds.save_to_disk(str(tmp_path / "saved"))
    local = _hub_spec(tmp_path, "local", "saved")  # a save_to_disk folder next to the spec: opened and counted
    hub = _hub_spec(tmp_path, "hub", "some-org/not-a-real-dataset")
    code, out, err = launch(capsys, "--config-name=smoke", f"output_dir={tmp_path / 'run'}", "dry_run=true",
                            "stages=[stage1]", f"stage_defs.stage1.datasets=['{local}','{hub}']")
    assert code == 0, err
    rows = {r["dataset"]: r for r in table(out)}
    assert rows["local"]["status"] == "ok" and rows["local"]["rows"] == "6"
    assert rows["hub"]["status"] == "not checked offline (hf id some-org/not-a-real-dataset)"
    assert rows["hub"]["rows"] == "-"


def test_dry_run_lists_every_problem_then_exits_2(capsys, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"q": f"question {i}", "p": f"answer {i}"}) + "\n" for i in range(3)))
    (tmp_path / "bad.jsonl").write_text('{"q": "a", "p": "b"}\n{"q": "c"}\n')
    specs = {}
    for name, data in (("small", "good.jsonl"), ("bad", "bad.jsonl")):
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(f"name: {name}\ntask: retrieval\ninstruction: find it\nsource: {{path: {data}}}\n"
                               f"fields: {{query: q, positive: p}}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")  # a run is already there and resume is off
    code, out, err = launch(capsys, "--config-name=smoke", f"output_dir={run}", "dry_run=true",
                            f"stage_defs.stage1.datasets=['{specs['small']}',demo/qnli.yaml]",
                            "stage_defs.stage1.batch_size=4",  # 3 rows cannot fill a homogeneous batch of 4
                            f"stage_defs.stage2.datasets=['{specs['bad']}',demo/stsb.yaml]",
                            "init_from=/nonexistent/final")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvembed: dry run error: 4 problem(s) (table above); first: ")
    rows = {(r["stage"], r["dataset"]): r["status"] for r in table(out)}
    assert rows[("stage1", "small")].startswith(f"ERROR {specs['small']}: 3 examples from 3 rows")
    assert rows[("stage1", "qnli")] == "ok" and rows[("stage2", "stsb")] == "ok"
    assert rows[("stage2", "bad")].startswith(f"ERROR {tmp_path / 'bad.jsonl'}:2: field 'p'")
    assert "ERROR output_dir" in out and "already holds a run" in out and "ERROR 'init_from'" in out
    assert os.listdir(run) == ["run.json"]
    # with a batch the small set can fill, and a fixed file, the same check passes
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"q": f"q {i}", "p": f"p {i}"}) + "\n" for i in range(4)))
    code, out, err = launch(capsys, "--config-name=smoke", f"output_dir={tmp_path / 'new'}", "dry_run=true",
                            f"stage_defs.stage1.datasets=['{specs['small']}',demo/qnli.yaml]",
                            "stage_defs.stage1.batch_size=3",
                            f"stage_defs.stage2.datasets=['{specs['bad']}',demo/stsb.yaml]")
    assert code == 0, err


def _header(spec_path):
    with open(spec_path, encoding="utf-8") as f:
        return f.readline()


def test_paper_recipes_list_only_specs_that_can_load(capsys):
    """Every spec under data_specs/nvembed is used by a paper recipe or excluded by it with a reason; those whose
    own header says they cannot load (placeholder id or fields) are exactly the excluded ones."""
    seen = set()
    for recipe in ("nvembed_v1", "nvembed_v2"):
        code, out, err = launch(capsys, f"--config-name={recipe}", "dry_run=true", "output_dir=/nonexistent/run")
        assert code == 0, err
        rows = table(out)
        for r in rows:
            path = os.path.join(SPECS, r["spec"])
            seen.add(os.path.normpath(path))
            cannot_load = "placeholder" in _header(path).lower()
            if r["status"].startswith("excluded: "):
                assert r["stage"] == "-" and cannot_load and len(r["status"]) > len("excluded: ") + 20, r
            else:
                hf = yaml.safe_load(open(path))["source"]["hf"]
                assert r["status"] == f"not checked offline (hf id {hf})" and not cannot_load, r
    assert seen == {os.path.normpath(p) for p in glob.glob(os.path.join(SPECS, "nvembed", "*", "*.yaml"))}


def test_check_recipe_script_in_a_real_process(tmp_path):
    """scripts/check_recipe.py with a recipe file path: what the user sees is the table and one line on stderr."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "check_recipe.py"),
                        os.path.join(REPO, "recipes", "smoke.yaml"), f"output_dir={tmp_path / 'x'}",
                        "stage_defs.stage1.batch_size=3000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("nvembed: dry run error: 2 problem(s)") and "batch_size 3000" in r.stderr
    assert "stage1  medquad" in r.stdout and not (tmp_path / "x").exists()
