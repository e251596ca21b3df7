"""Start-up faults (issue #14): every config, data or command-line mistake is one line on stderr and exit code 2,
found before the model loads, and leaves what was already on disk as it was; a retry after a failed start works."""

import copy
import dataclasses
import hashlib
import os
import typing

import pytest
from omegaconf import OmegaConf

from conftest import REPO, launch
from nvembed import config as C
from nvembed.config import load as config_load
from nvembed.cli import HYDRA_QUIET

QUIET = ["logging.progress_bar=false", "export_final=false"]


def snapshot(folder):
    """Every file under ``folder`` with its content hash and modification time."""
    snap = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            snap[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(),
                                                os.stat(p).st_mtime_ns)
    return snap


@pytest.fixture
def outdir(tmp_path):
    """An output folder that already holds a user's file (which no failed start may touch)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return out


def assert_one_line_error(code, err, kind, *parts):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nvembed: {kind} error: "), lines[0]
    # nothing of what nvembed adds to the command line for Hydra (++key=..., hydra.run.dir=., ...) shows
    assert "Traceback" not in err and "++" not in err and not any(q in err for q in HYDRA_QUIET)
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])


# ---- 1. range checks -------------------------------------------------------------------------------------------
NUMERIC = (int, float, typing.Optional[int], typing.Optional[float], typing.List[int], typing.List[float])


def _ranged_fields(schema=C.RunConfig, prefix=""):
    """(dotted key, field) for every numeric field of the schema; stage fields under stage_defs.stage1."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _ranged_fields(t, f"{prefix}{f.name}.")
        elif typing.get_origin(t) is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            yield from _ranged_fields(typing.get_args(t)[1], f"{prefix}{f.name}.stage1.")
        elif t in NUMERIC:
            yield f"{prefix}{f.name}", f


def _outside(f, rng):
    """A value just outside the field's range, of the field's own type."""
    is_int = "int" in str(f.type)
    step = 1 if is_int else 0.5
    if rng.ge is not None:
        v = rng.ge - step
    elif rng.gt is not None:
        v = rng.gt
    elif rng.le is not None:
        v = rng.le + step
    else:
        v = rng.lt
    v = int(v) if is_int else float(v)
    return [v] if "List" in str(f.type) else v


def _smoke():
    return OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "recipes", "smoke.yaml")))


def test_every_numeric_key_has_a_range_and_refuses_values_outside_it():
    fields = list(_ranged_fields())
    assert len(fields) >= 30  # the walk reaches every section (model, pooling, lora, loss, stage, eval, logging)
    missing = [k for k, f in fields if "range" not in f.metadata]
    assert not missing, f"numeric keys without a declared range: {missing}"
    helptext = C.describe()  # --help-config shows each range next to its key
    for key, f in fields:
        shown = key.replace("stage_defs.stage1.", "stage_defs.<name>.")
        assert any(line.startswith(f"{shown} (") and f"[{f.metadata['range']}" in line
                   for line in helptext.splitlines()), key
    good = C.validate(_smoke())
    config_load._check_ranges(good)  # the smoke recipe is inside every range
    for key, f in fields:  # validate() runs this check; calling it directly keeps 35 cases fast
        cfg = copy.deepcopy(good)
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[p] if isinstance(node, dict) else getattr(node, p)
        setattr(node, last, _outside(f, f.metadata["range"]))
        with pytest.raises(C.ConfigError) as e:
            config_load._check_ranges(cfg)
        assert str(e.value).startswith(f"'{key}' must "), str(e.value)


# typed on the command line by a user; the message names the key, the rule and what 0 or 1 means where it matters
RANGE_CASES = [
    ("stage_defs.stage1.max_steps=-1",
     "'stage_defs.stage1.max_steps' must be >= 0 (0 derives the steps from 'epochs'), got -1"),
    ("stage_defs.stage1.gradient_accumulation_steps=0", "'stage_defs.stage1.gradient_accumulation_steps' must be >= 1"),
    ("stage_defs.stage2.batch_size=0", "'stage_defs.stage2.batch_size' must be >= 1, got 0"),
    ("stage_defs.stage1.num_hard_negatives=-1", "'stage_defs.stage1.num_hard_negatives' must be >= 0, got -1"),
    ("stage_defs.stage1.learning_rate=-1e-4", "'stage_defs.stage1.learning_rate' must be > 0"),
    ("loss.temperature=0", "'loss.temperature' must be > 0, got 0.0"),
    ("loss.matryoshka_dims=[0,8]", "'loss.matryoshka_dims' must list values >= 1, got [0, 8]"),
    ("stage_defs.stage2.num_hard_negatives=0", "in_batch_negatives=false and num_hard_negatives=0"),
    ("stage_defs.stage1.datasets=[]", "'stage_defs.stage1.datasets' is empty"),
]


@pytest.mark.parametrize("override,message", RANGE_CASES, ids=[c[0].split("=")[0] for c in RANGE_CASES])
def test_range_error_is_one_line_and_writes_nothing(capsys, outdir, override, message):
    before = snapshot(outdir)
    code, _, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", override)
    assert_one_line_error(code, err, "config", message)
    assert snapshot(outdir) == before


def test_traceback_only_with_nvembed_debug(capsys, outdir, monkeypatch):
    monkeypatch.setenv("NVEMBED_DEBUG", "1")
    code, _, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", "loss.temperature=0")
    assert code == 2 and "Traceback" in err and "_check_ranges" in err
    assert err.strip().splitlines()[-1].startswith("nvembed: config error: 'loss.temperature' must be > 0")


# ---- 3. data errors: one line, naming file, line and field --------------------------------------------------------
def _spec(tmp_path, body, data=None, name="d"):
    """A spec file (and its data file) in tmp_path; returns the spec path and the data path."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    dpath = tmp_path / (f"{name}.parquet" if f"{name}.parquet" in body else f"{name}.jsonl")
    if data is not None:
        dpath.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path, dpath


RETR = "name: d\ntask: retrieval\ninstruction: find it\nsource: {path: d.jsonl}\nfields: {query: q, positive: p}\n"
OK = '{"q": "a question", "p": "an answer"}\n'
DATA_CASES = {
    "missing_file": (RETR, None, ["d.jsonl: data file not found"]),
    "malformed_jsonl": (RETR, OK + '{"q": "x", "p": \n' + OK, ["d.jsonl:2:", "malformed JSON"]),
    "missing_field": (RETR, OK + '{"q": "x"}\n', ["d.jsonl:2:", "field 'p'", "missing field"]),
    "empty_text": (RETR, OK + '{"q": "  ", "p": "y"}\n', ["d.jsonl:2:", "field 'q'", "empty text"]),
    "not_utf8": (RETR, OK.encode() + b'{"q": "caf\xe9", "p": "y"}\n', ["d.jsonl:2:", "cannot decode as utf-8",
                                                                      "source.encoding"]),
    "not_parquet": (RETR.replace("d.jsonl", "d.parquet"), "not a parquet file", ["d.parquet: cannot read as parquet"]),
    "unknown_task": (RETR.replace("retrieval", "retreival"), OK, ["'task' is 'retreival'", "valid choices"]),
    "typo_field": (RETR.replace("fields:", "feilds:"), OK, ["unknown key 'feilds'", "Did you mean 'fields'?"]),
    "one_class": ("name: d\ntask: classification\ninstruction: classify it\nsource: {path: d.jsonl}\n"
                  "fields: {text: t, label: l}\n", '{"t": "one", "l": "a"}\n{"t": "two", "l": "a"}\n',
                  ["classification needs at least 2 classes, found 1"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_error_is_one_line_before_the_model(capsys, tmp_path, outdir, case):
    body, data, parts = DATA_CASES[case]
    spec, _ = _spec(tmp_path, body, data)
    before = snapshot(outdir)
    # a tokenizer that does not exist: had the model loaded first, that would have been the error
    code, _, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", "stages=[stage1]",
                          f"stage_defs.stage1.datasets=['{spec}']", "stage_defs.stage1.batch_size=1",
                          "model.tokenizer=/nonexistent/tokenizer", *QUIET)
    assert_one_line_error(code, err, "data", str(spec.parent), *parts)
    assert snapshot(outdir) == before


# ---- 2. fewer rows than the batch ---------------------------------------------------------------------------------
def test_dataset_smaller_than_batch_is_refused(capsys, tmp_path, outdir):
    rows = "".join(f'{{"q": "question {i}", "p": "answer {i}"}}\n' for i in range(3))
    spec, _ = _spec(tmp_path, RETR, rows)
    before = snapshot(outdir)
    code, _, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", "stages=[stage1]",
                          f"stage_defs.stage1.datasets=['{spec}']", "stage_defs.stage1.batch_size=4", *QUIET)
    assert_one_line_error(code, err, "data", f"{spec}: 3 examples from 3 rows", "batch_size 4",
                          "lower 'stage_defs.stage1.batch_size' to 3 or less")
    assert snapshot(outdir) == before


# ---- 4 + 5. every stage checked before the model; the run folder is marked only after a good start ----------------
def test_stage2_error_before_training_then_retry_in_same_folder(capsys, tmp_path, outdir):
    good, _ = _spec(tmp_path, RETR.replace("d.jsonl", "g.jsonl").replace("name: d", "name: g"),
                    "".join(f'{{"q": "question {i}", "p": "answer {i}"}}\n' for i in range(8)), name="g")
    spec, _ = _spec(tmp_path, RETR, OK + '{"q": "x"}\n')
    fast = ["stage_defs.stage1.max_steps=1", "stage_defs.stage2.max_steps=1", "stage_defs.stage1.save_every=0",
            "stage_defs.stage2.save_every=0", f"stage_defs.stage1.datasets=['{good}']",
            f"stage_defs.stage2.datasets=['{good}','{spec}']", *QUIET]
    before = snapshot(outdir)
    code, out, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", *fast)
    assert_one_line_error(code, err, "data", f"{tmp_path / 'd.jsonl'}:2:", "field 'p'")
    assert "stage1 done" not in out  # stage 1 did not train first
    assert snapshot(outdir) == before  # no run.json, config.yaml, metrics: the folder is not marked
    # the user fixes the data and starts again with the same output_dir
    (tmp_path / "d.jsonl").write_text("".join(f'{{"q": "question {i}", "p": "answer {i}"}}\n' for i in range(8)))
    code, out, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", *fast)
    assert code == 0, err
    assert (outdir / "run.json").is_file() and (outdir / "stage2" / "final").is_dir()
    assert (outdir / "notes.txt").read_text() == "mine\n"
    # the run is now there: a fresh start on top of it, or a resume with a bad value, changes nothing
    before = snapshot(outdir)
    for extra, kind, part in [((), "run folder", "already holds a run"),
                              (("resume=true", "stage_defs.stage1.warmup_steps=-1"), "config", "warmup_steps")]:
        code, _, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", *fast, *extra)
        assert_one_line_error(code, err, kind, part)
        assert snapshot(outdir) == before


@pytest.mark.parametrize("override,parts", [
    (["eval.suites=[nope.yaml]"], ["'eval.suites'", "nope.yaml"]),
    # reference rows are measured after training: without this check a typo surfaced only at the very end
    (["eval.suites=[ci.yaml]", "eval.baselines=[bm25,'mini=/nope/model']"],
     ["'eval.baselines'", "/nope/model not found"]),
], ids=["suite", "baseline"])
def test_eval_mistakes_fail_before_anything(capsys, outdir, override, parts):
    before = snapshot(outdir)
    code, _, err = launch(capsys, "--config-name=smoke", f"output_dir={outdir}", "eval.enabled=true", *override,
                          *QUIET)
    assert_one_line_error(code, err, "config", *parts)
    assert snapshot(outdir) == before


# ---- 6. the command line itself ---------------------------------------------------------------------------------
CLI_CASES = [
    (["--config_name=smoke"], "Unknown option '--config_name=smoke'. Did you mean '--config-name'?"),
    (["--config-name=smkoe"], "No recipe 'smkoe'"),
    (["--config-name"], "Option '--config-name' needs a value"),
    (["--config-name=smoke", "smoke"], "'smoke' is not a key=value override"),
    (["--config-name=smoke", "stage_defs.stage1.datasets=[a"], "Cannot parse override 'stage_defs.stage1.datasets=[a'"),
    (["--config-name=smoke", "stage_defs.stage1.learning_rat=1"], "Did you mean 'learning_rate'?"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[str(i) for i in range(len(CLI_CASES))])
def test_command_line_mistakes_are_one_line(capsys, outdir, argv, message):
    before = snapshot(outdir)
    code, _, err = launch(capsys, f"output_dir={outdir}", *argv)
    assert_one_line_error(code, err, "config", message)
    assert snapshot(outdir) == before

