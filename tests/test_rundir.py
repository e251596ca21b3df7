"""The run folder's layout (nvembed.rundir), the contrastive objective and the plain backend, each on its own; and the
seams between them: the run folder and evaluation import nothing they should not."""

import ast
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_model_config
from nvembed.rundir import RunDir, checkpoints, is_weights_folder, locate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _weights(folder, step=None):
    os.makedirs(folder, exist_ok=True)
    for name in ("model.safetensors", "nvembed_model.json"):
        with open(os.path.join(folder, name), "w") as f:
            f.write("{}" if step is None else json.dumps({"step": step}))
    return str(folder)


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    shutil.copy(os.path.join(REPO, "recipes", "smoke.yaml"), root / "config.yaml")  # stages: stage1, stage2
    return root


def test_layout_names_every_place():
    r = RunDir("/x/run")
    assert (r.config, r.marker, r.final, r.eval_dir) == ("/x/run/config.yaml", "/x/run/run.json", "/x/run/final",
                                                          "/x/run/eval")
    assert r.stage_final("stage2") == "/x/run/stage2/final"
    assert r.checkpoint("stage1", 12) == "/x/run/stage1/checkpoint-12"
    assert r.eval_file("after_stage1@32") == "/x/run/eval/after_stage1@32.json"


def test_checkpoints_sorted_by_step_not_by_name(run):
    for step in (9, 10, 100):
        _weights(run / "stage1" / f"checkpoint-{step}")
    (run / "stage1" / "checkpoint-7").write_text("a file, not a checkpoint")
    os.makedirs(run / "stage1" / ".tmp-checkpoint-200-1")
    os.makedirs(run / "stage1" / "checkpoint-x")
    assert [os.path.basename(c) for c in checkpoints(str(run / "stage1"))] == \
        ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert checkpoints(str(run / "nothing")) == []


def test_locate_prefers_the_last_finished_stage_then_the_newest_checkpoint(run):
    from nvembed.export import ExportError

    with pytest.raises(ExportError, match="no stage weights found"):
        locate(str(run))
    _weights(run / "stage1" / "final")
    _weights(run / "stage2" / "checkpoint-9")
    _weights(run / "stage2" / "checkpoint-10")
    os.makedirs(run / "stage2" / "checkpoint-11")  # no weights (a save that never finished): not a candidate
    assert locate(str(run)) == (str(run / "stage2" / "checkpoint-10"), str(run))
    _weights(run / "stage2" / "final")
    assert locate(str(run)) == (str(run / "stage2" / "final"), str(run))
    # a stage/checkpoint folder: itself, with the run above it
    assert locate(str(run / "stage2" / "checkpoint-9")) == (str(run / "stage2" / "checkpoint-9"), str(run))
    assert locate(str(run / "stage1" / "final")) == (str(run / "stage1" / "final"), str(run))
    lone = _weights(run.parent / "lone")
    assert locate(lone) == (lone, None)
    with pytest.raises(ExportError, match="no such folder"):
        locate(str(run / "missing"))
    with pytest.raises(ExportError, match="neither a run directory"):
        locate(str(run / "stage1"))


def test_locate_refuses_an_exported_model(run):
    from nvembed.export import ExportError, is_export

    folder = run / "final"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "nvembed", "architectures": ["NVEmbedModel"]}))
    (folder / "model.safetensors").write_text("")
    assert is_export(str(folder)) and not is_weights_folder(str(folder))
    with pytest.raises(ExportError, match="already an exported model"):
        locate(str(folder))


def test_rundir_and_evaluation_import_no_cycle():
    """rundir is bottom floor (nothing from training); the trainer (with evaluation) does not import the CLI."""
    code = ("import sys; import nvembed.rundir; "
            "assert not [m for m in sys.modules if m.startswith(('nvembed.training', 'nvembed.model'))], sys.modules; "
            "import nvembed.training.trainer, nvembed.training.evaluation; "
            "assert 'nvembed.cli' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_function_outside_the_trainer_takes_the_trainer():
    found = []
    for path in glob.glob(os.path.join(REPO, "nvembed", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "scripts", "*.py")):
        if path.endswith(os.path.join("training", "trainer.py")):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(a.arg == "trainer" for a in node.args.args + node.args.kwonlyargs):
                    found.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name}")
    assert found == []


# ---- the objective ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """A tiny embedder and one collated batch with teacher scores on some rows."""
    from nvembed.data.example import Example
    from nvembed.model import build_embedder
    from nvembed.training.collate import Collator

    cfg = tiny_model_config()
    cfg.lora.dropout = 0.0
    emb = build_embedder(cfg, seed=0)
    col = Collator(emb.tokenizer, cfg.query_template, 16, 24, 1, cfg.add_eos, cfg.pooling.exclude_instruction)
    rows = [Example(query=f"question {i} about hearts", positive=f"answer {i} on the heart", negatives=[f"off {i}"],
                    teacher_scores=[1.0, 0.0] if i % 2 else None) for i in range(4)]
    return emb, col(rows)


def test_objective_is_infonce_plus_weighted_distillation(tiny):
    from nvembed.config import RunConfig, StageConfig
    from nvembed.losses import InfoNCELoss, MatryoshkaLoss, distill_kl
    from nvembed.training.objective import ContrastiveObjective

    emb, batch = tiny
    cfg = RunConfig()
    st = StageConfig()
    cfg.loss.matryoshka_dims, cfg.loss.distill_weight = [8], 0.5
    obj = ContrastiveObjective(cfg.loss, st)
    with torch.no_grad():
        q, d = emb(**batch.queries), emb(**batch.docs)
        out = obj(emb, batch)
    ref = MatryoshkaLoss(InfoNCELoss(cfg.loss.temperature, st.in_batch_negatives, cfg.loss.mask_false_negatives),
                         [8])(q, d, batch.group, 0, batch.pos_keys, batch.doc_keys)
    rows = torch.isfinite(batch.teacher_scores).all(dim=1)
    kl = distill_kl(q[rows], d.view(4, batch.group, -1)[rows], batch.teacher_scores[rows], cfg.loss.temperature,
                    cfg.loss.distill_temperature)
    torch.testing.assert_close(out.loss, ref.loss + 0.5 * kl)
    assert obj.counts.as_dict() == {"batches": 1, "skipped_batches": 0, "examples": 2, "unscored_examples": 2}


def test_plain_backend_steps_saves_and_loads(tiny, tmp_path):
    """PlainBackend in one process: the step clips and returns the norm before clipping; a checkpoint it saves
    loads back into a fresh model with the same weights and optimizer state."""
    from nvembed.config import RunConfig, StageConfig
    from nvembed.model import build_embedder
    from nvembed.training import checkpoint as ckpt
    from nvembed.training.backend import PlainBackend, make_backend
    from nvembed.training.objective import ContrastiveObjective
    from nvembed.training.trainer import make_accelerator

    emb, batch = tiny
    acc = make_accelerator("fp32")
    backend = make_backend(acc, emb)
    assert type(backend) is PlainBackend and not backend.sharded()
    backend.prepare_model()
    st = StageConfig(learning_rate=1e-3, max_grad_norm=1e-3, warmup_steps=0)
    opt, sched = backend.prepare_stage(st, total=4)
    obj = ContrastiveObjective(RunConfig().loss, st)
    acc.backward(obj(backend.model, batch).loss)
    params = [p for p in emb.parameters() if p.requires_grad]
    expected = float(torch.norm(torch.stack([p.grad.norm() for p in params])))
    before = {k: v.clone() for k, v in emb.trainable_state_dict().items()}
    norm = backend.step(opt, sched, st.max_grad_norm)
    assert norm == pytest.approx(expected, rel=1e-5) and norm > st.max_grad_norm
    assert all(p.grad is None for p in params)
    after = emb.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    run = RunDir(str(tmp_path))
    backend.save(run.checkpoint("stage1", 1), opt, sched, {"stage": "stage1", "step": 1, "global_step": 1})
    assert ckpt.verify(run.checkpoint("stage1", 1)) is None and run.checkpoints("stage1") == [run.checkpoint("stage1", 1)]

    fresh = make_backend(acc, build_embedder(emb.cfg, seed=1))
    fresh.prepare_model()
    opt2, sched2 = fresh.prepare_stage(st, total=4)
    state = fresh.load(run.checkpoint("stage1", 1), opt2, sched2)
    assert state["step"] == 1 and sched2.scheduler.last_epoch == sched.scheduler.last_epoch
    for k, v in fresh.embedder.trainable_state_dict().items():
        torch.testing.assert_close(v, after[k])
    with fresh.full_weights() as model:
        assert model is fresh.embedder
