"""Score distillation from data: teacher scores in specs -> Example.teacher_scores -> masked KL in the trainer."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_TOKENIZER
from nvembed.config import RunConfig, StageConfig
from nvembed.data import build_stage_data
from nvembed.data.example import Example
from nvembed.data.spec import SpecError, load_spec
from nvembed.losses import distill_kl
from nvembed.training.objective import ContrastiveObjective

QUIET = dict(log=lambda m: None)
TRAIN = os.path.join(REPO, "train", "train.py")


def _score(text):
    """A distinct score per text, so alignment can be checked from the text alone."""
    return round(sum(map(ord, text)) / 1000.0, 6)


def mined_rows(n=40, n_neg=4):
    rows = []
    for i in range(n):
        pos = [f"answer {i} first", f"answer {i} second"]
        negs = [f"wrong {i}-{j}" for j in range(n_neg if i % 5 else 1)]  # every 5th row has a single negative
        rows.append({"query": f"question {i}", "positives": pos, "negatives": negs,
                     "positive_scores": [_score(t) for t in pos], "negative_scores": [_score(t) for t in negs]})
    return rows


def write_spec(tmp_path, rows, extra="", fields=None, name="mined"):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fields = fields or ("{query: query, positive: positives, negatives: negatives, "
                        "positive_scores: positive_scores, negative_scores: negative_scores}")
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\ntask: retrieval\ninstruction: Given a question, retrieve the answer\n"
                 f"source: {{path: {name}.jsonl}}\nfields: {fields}\n{extra}", encoding="utf-8")
    return str(p)


def _check_aligned(ex: Example):
    assert ex.teacher_scores is not None
    assert ex.teacher_scores[0] == pytest.approx(_score(ex.positive))
    assert ex.teacher_scores[1:] == pytest.approx([_score(t) for t in ex.negatives])


@pytest.mark.parametrize("cap", [None, 2])
def test_teacher_scores_follow_chosen_positive_and_negatives(tmp_path, cap):
    extra = "" if cap is None else f"num_hard_negatives: {cap}\n"
    path = write_spec(tmp_path, mined_rows(), extra)
    n_neg = 3 if cap is None else 2
    data = build_stage_data([path], num_hard_negatives=n_neg, batch_size=8, **QUIET)
    scored = unscored = 0
    chosen_negs = set()
    for step in range(data.steps_per_epoch):
        for ex in data.batch(step):
            assert len(ex.negatives) == n_neg
            if ex.query.split()[-1] in {str(i) for i in range(0, 40, 5)}:
                # one own negative, the rest random fillers: no teacher score for the fillers -> none at all
                assert ex.teacher_scores is None
                unscored += 1
            else:
                _check_aligned(ex)
                assert all(t.startswith("wrong") for t in ex.negatives)
                chosen_negs.add(tuple(ex.negatives))
                scored += 1
    assert scored == 32 and unscored == 8
    assert data.stats["mined"]["unscored_examples"] == 8
    # the subsample draws different negatives (and orders them as in the row), not always the head
    assert len({n[0].split("-")[1] for n in chosen_negs}) > 1
    assert all(list(n) == sorted(n) for n in chosen_negs)


def test_scores_survive_dedup_and_positive_removal(tmp_path):
    row = {"query": "q", "positives": ["p"], "negatives": ["n1", "p", "n1", "n2"],
           "positive_scores": 0.9, "negative_scores": [0.1, 0.8, 0.5, 0.2]}
    path = write_spec(tmp_path, [row, {**row, "query": "q2"}])
    data = build_stage_data([path], num_hard_negatives=2, batch_size=2, **QUIET)
    for ex in data.batch(0):
        assert ex.negatives == ["n1", "n2"] and ex.teacher_scores == [0.9, 0.1, 0.2]  # first n1 score wins


def test_score_spec_validation(tmp_path):
    rows = mined_rows(4)
    with pytest.raises(SpecError, match="set both"):
        load_spec(write_spec(tmp_path, rows, fields="{query: query, positive: positives, negatives: negatives, "
                                                      "positive_scores: positive_scores}"))
    bad = [dict(r) for r in rows]
    bad[2]["negative_scores"] = bad[2]["negative_scores"][:-1]
    with pytest.raises(SpecError, match=r"mined.jsonl:3: field 'negative_scores'.*scores for .* texts"):
        build_stage_data([write_spec(tmp_path, bad)], **QUIET)
    data = build_stage_data([write_spec(tmp_path, bad, "on_error: skip\n")], batch_size=2, **QUIET)
    assert data.stats["mined"]["rows_skipped"] == 1
    bad[1]["positive_scores"] = ["high", 0.1]
    with pytest.raises(SpecError, match="not a number"):
        build_stage_data([write_spec(tmp_path, bad)], **QUIET)
    cls = tmp_path / "c.yaml"
    cls.write_text("name: c\ntask: classification\ninstruction: x\nsource: {path: c.jsonl}\n"
                   "fields: {text: t, label: y, positive_scores: a, negative_scores: b}\n")
    with pytest.raises(SpecError, match="for task 'retrieval'"):
        load_spec(cls)


def test_collator_marks_unscored_rows():
    from transformers import AutoTokenizer

    from nvembed.training.collate import Collator

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    col = Collator(tok, "Instruct: {instruction}\nQuery: ", 16, 16, num_hard_negatives=1)
    a = Example("q1", "p1", ["n1", "x"], teacher_scores=[1.0, 0.5, 0.1])
    b = Example("q2", "p2", ["n2"])
    batch = col([a, b])
    assert batch.teacher_scores.shape == (2, 2)
    assert batch.teacher_scores[0].tolist() == [1.0, 0.5] and torch.isnan(batch.teacher_scores[1]).all()
    assert col([b, b]).teacher_scores is None
    assert col([Example("q", "p", ["n"], teacher_scores=[1.0])]).teacher_scores is None  # too short to align


def test_distill_kl_grads_flow_and_unscored_rows_are_left_out():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_(True)
    d = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_(True)
    kl = distill_kl(q, d.view(3, 2, 8), torch.tensor([[2.0, 0.0]] * 3), temperature=0.05)
    kl.backward()
    assert kl.item() > 0 and q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0

    cfg = RunConfig()
    cfg.loss.distill_weight = 0.5
    objective = ContrastiveObjective(cfg.loss, StageConfig())
    q.grad = d.grad = None
    ts = torch.tensor([[2.0, 0.0], [float("nan")] * 2, [0.0, 1.0]])
    out = objective.distill(q, d, SimpleNamespace(teacher_scores=ts, group=2))
    out.backward()
    assert q.grad[1].abs().sum() == 0 and q.grad[0].abs().sum() > 0 and q.grad[2].abs().sum() > 0
    assert d.grad[2:4].abs().sum() == 0
    assert objective.distill(q, d, SimpleNamespace(teacher_scores=None, group=2)) is None
    assert objective.counts.as_dict() == {"batches": 1, "skipped_batches": 1, "examples": 2, "unscored_examples": 4}


def _train(out, spec, *extra):
    cmd = [sys.executable, TRAIN, "--config-name=smoke", f"output_dir={out}", "stages=[stage1]",
           "stage_defs.stage1.max_steps=2", f"stage_defs.stage1.datasets=[{spec}]", "export_final=false",
           "logging.progress_bar=false", "logging.wandb=false", "logging.tensorboard=false", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    events = lambda e: [x for x in rows if x.get("event") == e]  # noqa: E731
    return r.stdout, events("step"), events("stage_summary")


def test_smoke_training_with_distillation(tmp_path):
    # every row has >= 1 negative and the smoke stage asks for 1: every example carries teacher scores
    spec = os.path.abspath(write_spec(tmp_path, mined_rows()))
    log, steps, (summary,) = _train(tmp_path / "kd", spec, "loss.distill_weight=0.5")
    assert len(steps) == 2 and all(s["distill_examples"] == 4 for s in steps)
    assert summary["distill"] == {"batches": 2, "skipped_batches": 0, "examples": 8, "unscored_examples": 0}
    assert "distillation on 2 micro-batches" in log
    _, plain, (psum,) = _train(tmp_path / "plain", spec)
    assert "distill" not in psum and "distill_examples" not in plain[0]
    # same seed, data and weights at step 1: the only difference is the KL term
    assert steps[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-6)
    assert steps[0]["loss"] > plain[0]["loss"]
