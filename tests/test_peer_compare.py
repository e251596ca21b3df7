"""scripts/peer_compare.py end to end on the smoke recipe: real nvembed runs (one train.py process), a real
sentence-transformers peer trained for the same seconds on the same batches, both evaluated on the CI suite."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import peer_compare  # noqa: E402

SEEDS = [1, 2]
SHORT = ["stage_defs.stage1.max_steps=2", "stage_defs.stage2.max_steps=1"]


def _argv(out, *more):
    return ["--recipe", "smoke", "--out", str(out), "--seeds", *map(str, SEEDS), "--suite", "ci.yaml",
            "--set", *SHORT, *more]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("peer")
    assert peer_compare.main(_argv(out)) == 0
    return out, json.loads((out / "peer.json").read_text())


def _stage_seconds(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    summaries = [r for r in rows if r.get("event") == "stage_summary"]
    assert [r["stage"] for r in summaries] == ["stage1", "stage2"]
    return sum(r["seconds"] for r in summaries), sum(r["steps"] for r in summaries)


def test_both_models_trained_for_the_same_seconds_and_evaluated(chain):
    out, data = chain
    assert [r["seed"] for r in data["runs"]] == SEEDS
    assert data["suite"] == os.path.join(REPO, "data_specs", "eval", "ci.yaml")
    for r in data["runs"]:
        nv, peer = r["nvembed"], r["peer"]
        seconds, steps = _stage_seconds(nv["run"])
        assert nv["seconds"] == pytest.approx(seconds) and nv["steps"] == steps == 3
        assert os.path.isfile(os.path.join(nv["run"], "final", "config.json"))
        # the peer's budget is the nvembed run's training time; it stops within half an average step before it and
        # one step after it
        assert peer["budget_seconds"] == pytest.approx(seconds)
        assert peer["steps"] >= 1
        per_step = peer["seconds"] / peer["steps"]
        assert seconds - per_step / 2 - 1e-6 <= peer["seconds"] <= seconds + peer["last_step_seconds"] + 1e-6
        for who in (nv, peer):  # every task type of the suite was scored
            assert set(who["scores"]) == {"all", "retrieval", "sts", "classification", "clustering"}
            assert set(who["tasks"]) == {"med", "stsb", "mpqa", "trec-qc"}
            assert all(0 <= v <= 100 for v in who["scores"].values())
        assert nv["scores"] != peer["scores"]  # two different models


def test_peer_is_a_plain_sentence_transformer_trained_from_the_recipe_backbone(chain):
    import torch
    from sentence_transformers import SentenceTransformer

    from nvembed.eval.encoders import custom_code
    from nvembed.model import load_backbone
    from nvembed.rundir import RunDir

    out, data = chain
    run = data["runs"][0]
    folder = run["peer"]["model"]
    assert custom_code(folder) == []  # sentence-transformers' own modules, no adapter or remote code
    assert not os.path.exists(os.path.join(folder, "adapter_config.json"))
    st = SentenceTransformer(folder, device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling"]
    assert st[1].pooling_mode == "mean"
    emb = st.encode(["What causes a sprained ankle?", "a document"], normalize_embeddings=True)
    assert emb.shape == (2, 64)  # the smoke recipe's hidden size
    # the same backbone (seed, layers) as the nvembed run, causal, and its LoRA merged in: weights moved from it
    cfg = RunDir(run["nvembed"]["run"]).load_config()
    torch.manual_seed(cfg.seed)
    base = load_backbone(cfg.model, vocab_size=len(st.tokenizer))
    trained = st[0].auto_model
    assert len(trained.layers) == len(base.layers) == cfg.model.random_init["num_hidden_layers"]
    assert trained.config.is_causal is not False
    assert torch.equal(trained.embed_tokens.weight, base.embed_tokens.weight)  # LoRA does not touch embeddings
    q0, q1 = base.layers[0].self_attn.q_proj.weight, trained.layers[0].self_attn.q_proj.weight
    assert q0.shape == q1.shape and not torch.allclose(q0, q1)


def test_table_holds_both_rows_and_the_difference(chain):
    out, data = chain
    md = (out / "peer.md").read_text()
    for s in SEEDS:
        assert f"| {s} | nvembed |" in md and f"| {s} | peer |" in md
    diffs = [r["nvembed"]["scores"]["all"] - r["peer"]["scores"]["all"] for r in data["runs"]]
    mean = sum(diffs) / 2
    sd = abs(diffs[0] - diffs[1]) / 2 ** 0.5  # sample std of two values
    assert data["summary"]["difference"]["all"] == [pytest.approx(mean), pytest.approx(sd)]
    assert f"| all | nvembed - peer |  |  | {mean:+.2f} ± {sd:.2f} |" in md
    nv = [r["nvembed"]["scores"]["all"] for r in data["runs"]]
    assert data["summary"]["nvembed"]["all"][0] == pytest.approx(sum(nv) / 2)


def test_peer_batches_are_the_recipe_stage1_batches(chain):
    from nvembed.eval.peer import peer_rows
    from nvembed.paths import specs_root
    from nvembed.preflight import load_stage
    from nvembed.rundir import RunDir

    out, data = chain
    cfg = RunDir(data["runs"][1]["nvembed"]["run"]).load_config()
    rows, columns = peer_rows(cfg, "stage1", log=lambda m: None)
    assert columns == ["anchor", "positive", "negative_1"]
    it = rows()
    batches = load_stage(cfg, "stage1", specs_root(), log=lambda m: None)
    for step in range(2):
        for ex in batches.batch(step):
            row = next(it)
            assert row["anchor"] == f"Instruct: {ex.instruction}\nQuery: {ex.query}"
            assert (row["positive"], row["negative_1"]) == (ex.positive, ex.negatives[0])


def test_rerun_continues_without_training_again(chain, capsys):
    out, data = chain
    peer_dir = out / "peer" / f"seed={SEEDS[0]}"
    watched = [peer_dir / "train.json", peer_dir / "eval.json", peer_dir / "model" / "config.json",
               out / "nvembed" / f"seed={SEEDS[0]}" / "metrics.jsonl",
               out / "nvembed" / f"seed={SEEDS[0]}" / "peer_eval.json"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert peer_compare.main(_argv(out)) == 0
    err = capsys.readouterr().err
    assert "train.py" not in err and "evaluating" not in err
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "peer.json").read_text())["runs"] == data["runs"]


@pytest.mark.parametrize("argv, says", [
    (["--seeds", "1", "1"], "nvembed: experiment error: --seeds: give distinct seeds"),
    (["--set", "model.pooling.mode=mean,last_token"], "nvembed: experiment error: --set 'model.pooling.mode=mean,last_"),
    (["--set", "stage_defs.stage1.learning_rat=1"], "nvembed: config error: Unknown config key"),
    (["--suite", "no_such_suite.yaml"], "nvembed: suite error:"),
    (["--recipe", "no_such_recipe"], "nvembed: experiment error: --recipe: no recipe"),
])
def test_bad_requests_fail_before_anything_is_written(tmp_path, capsys, argv, says):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as e:
        peer_compare.main(["--recipe", "smoke", "--out", str(out), *argv])  # a later --recipe wins
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_peer_embeds_the_texts_without_the_backbones_chat_template(tmp_path):
    """sentence-transformers 6 wraps every text in a chat template found in the folder (SmolLM2-Instruct has one):
    the peer's folder has none, so it embeds the texts themselves."""
    import shutil

    from conftest import TINY_TOKENIZER, tiny_model_config
    from nvembed.config import RunConfig, StageConfig
    from nvembed.eval.peer import build_peer

    tok = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER, tok)
    (tok / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>system\nYou are a helpful "
                                             "assistant<|endoftext|>{{ m['content'] }}{% endfor %}")
    cfg = RunConfig(model=tiny_model_config(tokenizer=str(tok)), stages=["stage1"],
                    stage_defs={"stage1": StageConfig()})
    model = build_peer(cfg, str(tmp_path / "peer"))
    assert model.preprocess(["hello world"])["input_ids"].tolist() == [model.tokenizer("hello world")["input_ids"]]
    assert not (tmp_path / "peer" / "chat_template.jinja").exists()
