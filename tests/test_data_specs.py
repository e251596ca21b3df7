"""Spec schema, bad input errors, shipped specs and recipes."""

import glob
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nvembed.config import validate
from nvembed.data import SpecError, build_stage_data, load_spec, resolve_spec_path

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def retrieval_spec(tmp_path, data_lines, extra=""):
    write(tmp_path, "d.jsonl", "\n".join(data_lines) + "\n")
    return write(tmp_path, "r.yaml", "name: r\ntask: retrieval\ninstruction: Find it\nsource:\n  path: d.jsonl\n"
                 "fields:\n  query: q\n  positive: p\n  negatives: n\n" + extra)


def build(spec, **kw):
    return build_stage_data([str(spec)], log=lambda m: None, **kw)


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\ntask: sts\ninstruction: i\nsource: {path: a.jsonl}\nweigth: 2\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "weigth" in msg and "weight" in msg and "Valid keys" in msg
    p = write(tmp_path, "bad2.yaml", "name: x\ntask: sts\ninstruction: i\nsource: {path: a.jsonl, splt: x}\n")
    with pytest.raises(SpecError, match="source.splt"):
        load_spec(p)


@pytest.mark.parametrize("body,match", [
    ("task: ranking", "valid choices"), ("on_error: ignore", "on_error"), ("weight: 0", "weight"),
    ("label_mode: both", "label_mode"), ("source: {path: a.txt}", "format"),
    ("source: {path: a.jsonl, hf: x/y}", "exactly one"),
])
def test_bad_values(tmp_path, body, match):
    base = {"name": "x", "task": "retrieval", "instruction": "i", "source": "{path: a.jsonl}",
            "fields": "{query: q, positive: p}"}
    k, v = body.split(": ", 1)
    base[k] = v
    p = write(tmp_path, "s.yaml", "\n".join(f"{a}: {b}" for a, b in base.items()))
    with pytest.raises(SpecError, match=match):
        load_spec(p)


def test_missing_required_field_mapping(tmp_path):
    p = write(tmp_path, "s.yaml", "name: x\ntask: sts\ninstruction: i\nsource: {path: a.jsonl}\n"
              "fields: {text1: a, text2: b}\n")
    with pytest.raises(SpecError, match="fields.score"):
        load_spec(p)


def test_malformed_jsonl_line(tmp_path):
    spec = retrieval_spec(tmp_path, ['{"q": "a", "p": "b"}', '{"q": "c", "p": '])
    with pytest.raises(SpecError) as e:
        build(spec)
    assert "d.jsonl:2" in str(e.value) and "malformed JSON" in str(e.value)


def test_missing_field_and_empty_text(tmp_path):
    spec = retrieval_spec(tmp_path, ['{"q": "a", "p": "b"}', '{"q": "c"}'])
    with pytest.raises(SpecError) as e:
        build(spec)
    assert "d.jsonl:2" in str(e.value) and "'p'" in str(e.value) and "missing" in str(e.value)
    spec = retrieval_spec(tmp_path, ['{"q": "a", "p": "b"}', '{"q": "c", "p": "d"}', '{"q": " ", "p": "d"}'])
    with pytest.raises(SpecError) as e:
        build(spec)
    assert "d.jsonl:3" in str(e.value) and "'q'" in str(e.value) and "empty" in str(e.value)
    spec = retrieval_spec(tmp_path, ['{"q": "a", "p": "b", "n": ["x", ""]}'])
    with pytest.raises(SpecError, match=r"d.jsonl:1: field 'n\[1\]'"):
        build(spec)


def test_on_error_skip_counts_rows(tmp_path):
    lines = ['{"q": "a", "p": "b"}', '{"q": "c"}', 'not json', '{"q": "", "p": "x"}', '{"q": "e", "p": "f"}']
    spec = retrieval_spec(tmp_path, lines, "on_error: skip\n")
    logs = []
    data = build_stage_data([str(spec)], log=logs.append)
    st = data.stats["r"]
    assert st["rows_read"] == 5 and st["rows_skipped"] == 3 and st["examples"] == 2
    assert sum(st["skipped"].values()) == 3 and any("d.jsonl:3" in m for m in logs)


def test_encoding(tmp_path):
    (tmp_path / "d.tsv").write_bytes("sentence\tlabel\ncaf\xe9 ol\xe9\tA\nna\xefve\tB\nfoo\tA\n".encode("latin-1"))
    body = ("name: c\ntask: classification\ninstruction: Classify\nsource:\n  path: d.tsv\n{enc}"
            "fields:\n  text: sentence\n  label: label\n")
    spec = write(tmp_path, "c.yaml", body.format(enc=""))
    with pytest.raises(SpecError) as e:
        build(spec)
    assert "d.tsv:2" in str(e.value) and "latin-1" in str(e.value)
    spec = write(tmp_path, "c.yaml", body.format(enc="  encoding: latin-1\n"))
    texts = {ex.query for s in range(4) for ex in build(spec, batch_size=3).batch(s)}
    assert "café olé" in texts


def test_corpus_missing_id(tmp_path):
    write(tmp_path, "corpus.jsonl", '{"id": "d1", "text": "doc one"}\n')
    write(tmp_path, "q.jsonl", '{"q": "a", "pid": "d1"}\n{"q": "b", "pid": "d9"}\n')
    spec = write(tmp_path, "s.yaml", "name: s\ntask: retrieval\ninstruction: i\nsource: {path: q.jsonl, "
                 "corpus: corpus.jsonl}\nfields: {query: q, positive_ids: pid}\n")
    with pytest.raises(SpecError, match=r"q.jsonl:2.*d9"):
        build(spec)


def test_stage_mismatch(tmp_path):
    spec = retrieval_spec(tmp_path, ['{"q": "a", "p": "b"}'], "stages: [stage2]\n")
    with pytest.raises(SpecError, match="stage1"):
        build(spec, stage="stage1")


def test_shipped_paper_and_demo_specs_validate():
    paths = sorted(p for sub in ("nvembed", "demo")  # data_specs/eval belongs to the evaluation suites
                   for p in glob.glob(str(ROOT / "data_specs" / sub / "**" / "*.yaml"), recursive=True))
    assert len(paths) > 40
    names = {load_spec(p).task for p in paths}  # no source is read
    assert names == {"retrieval", "classification", "clustering", "sts"}


@pytest.mark.parametrize("version", [1, 2])
def test_recipes_validate_and_reference_existing_specs(version):
    cfg = validate(OmegaConf.load(ROOT / "recipes" / f"nvembed_v{version}.yaml"))
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-v0.1" and cfg.model.lora.r == 16
    s1, s2 = cfg.stage_defs["stage1"], cfg.stage_defs["stage2"]
    assert s1.in_batch_negatives and not s2.in_batch_negatives and s2.batching == "blended"
    tasks = set()
    for name in cfg.stages:
        for p in cfg.stage_defs[name].datasets:
            spec = load_spec(resolve_spec_path(p, ROOT / "data_specs"))
            assert not spec.stages or name in spec.stages
            tasks.add((name, spec.task, spec.label_mode if spec.task != "retrieval" else ""))
    assert {t for n, t, _ in tasks if n == "stage1"} == {"retrieval"}
    modes = {m for n, t, m in tasks if t in ("classification", "clustering")}
    assert modes == ({"label"} if version == 1 else {"label", "example"})
    extra = {"scifact", "miracl", "mrtydi"}
    got = {Path(p).stem for p in s1.datasets}
    assert (extra <= got) == (version == 2)
    # v2's HoVer and NFCorpus have no usable public copy: excluded with a reason, never silently listed
    excluded = {Path(x.spec).stem for x in cfg.excluded_datasets}
    assert ({"hover", "nfcorpus"} <= excluded) == (version == 2) and not excluded & got


def test_demo_files_are_training_splits_only():
    text = (ROOT / "data_specs" / "demo" / "ATTRIBUTION.md").read_text()
    assert "train" in text.lower()
    for spec in glob.glob(str(ROOT / "data_specs" / "demo" / "*.yaml")):
        s = load_spec(spec)
        assert "test" not in (s.source.path or "") and s.name not in ("ag_news", "mpqa", "cr")
    total = sum(p.stat().st_size for p in (ROOT / "data_specs" / "demo" / "files").glob("*"))
    assert total < 16e6  # incl. the mined stage-1 files (texts inline)
    first = json.loads((ROOT / "data_specs" / "demo" / "files" / "stsb_train.jsonl").open().readline())
    assert set(first) >= {"text1", "text2", "score"}


def test_per_row_instruction_column(tmp_path):
    import json as _json

    from nvembed.data import build_stage_data

    rows = [{"q": f"question {i}", "p": f"passage {i}", "task": "Find the passage" if i % 2 else ""} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.yaml").write_text("name: syn\ntask: retrieval\ninstruction: Default task\n"
                                     "source: {path: d.jsonl}\nfields: {query: q, positive: p, instruction: task}\n")
    data = build_stage_data([str(tmp_path / "s.yaml")], stage="stage1", num_hard_negatives=1, batch_size=6,
                            specs_root=str(tmp_path), log=lambda m: None)
    got = {ex.query: ex.instruction for ex in data.batch(0)}
    for i in range(6):
        assert got[f"question {i}"] == ("Find the passage" if i % 2 else "Default task")
