"""mteb 2.x for real (pinned in the dev extras), offline: MTEBEncoderWrapper against mteb's EncoderProtocol and its
DataLoaders, local tasks built with mteb's own task classes, and `scripts/evaluate.py --mteb` giving the same main
scores as nvembed's own evaluators on the same data and encoder (all-MiniLM-L6-v2, instruction prompts forced on
so that instruction routing changes the scores)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from nvembed import errors
from nvembed.eval import evaluate_retrieval, evaluate_sts_file, load_beir, load_encoder, subset_beir
from nvembed.eval.mteb_wrapper import MTEBEncoderWrapper, local_retrieval_task, local_sts_task
from nvembed.eval.retrieval import doc_text
from nvembed.eval.sts import load_sts

mteb = pytest.importorskip("mteb")

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "data_specs" / "eval"
INS = "Given a question about information science, retrieve abstracts that answer it"


from conftest import MINILM, needs_minilm  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small BEIR folder (ADI: 10 queries, 30 documents cut to 200 characters, titles kept) and 30 STS-B pairs."""
    root = tmp_path_factory.mktemp("mteb")
    corpus, queries, qrels = subset_beir(*load_beir(EVAL / "beir" / "adi"), max_queries=10, max_corpus=30,
                                         max_judged_docs=24)
    beir = root / "adi-small"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": c["title"], "text": c["text"][:200]})
                                               + "\n" for d, c in corpus.items()), encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                for q, t in queries.items()), encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, docs in qrels.items() for d, s in docs.items()), encoding="utf-8")
    s1, s2, gold = load_sts(EVAL / "sts" / "stsbenchmark-test.jsonl", max_pairs=30)
    sts = root / "stsb-small.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": g}) + "\n"
                           for a, b, g in zip(s1, s2, gold)), encoding="utf-8")
    assert len(corpus) == 30 and len(queries) == 10
    assert sum(1 for c in corpus.values() if c["title"]) > 20  # the title/body path of mteb's corpus is exercised
    return {"beir": beir, "sts": sts}


class MemoEncoder:
    """The real MiniLM encoder, each (instruction, text) encoded once: the tests compare several evaluations of
    the same texts, and CPU time is the test budget. A wrong text or instruction misses the memo and is encoded."""

    def __init__(self, inner):
        self.inner, self.name, self.memo = inner, inner.name, {}

    def encode(self, texts, *, instruction=None, batch_size=32, show_progress=False):
        new = list(dict.fromkeys(t for t in texts if (instruction, t) not in self.memo))
        if new:
            for t, e in zip(new, self.inner.encode(new, instruction=instruction, batch_size=batch_size)):
                self.memo[(instruction, t)] = e
        return np.stack([self.memo[(instruction, t)] for t in texts])


@pytest.fixture(scope="module")
def minilm():
    return MemoEncoder(load_encoder(str(MINILM), use_instructions=True))


def _evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate", REPO / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_minilm
def test_wrapper_is_an_mteb_encoder(minilm, data):
    from mteb._create_dataloaders import create_dataloader
    from mteb.models import EncoderProtocol, SearchProtocol
    from mteb.models.model_meta import ScoringFunction
    from mteb.types import PromptType

    w = MTEBEncoderWrapper(minilm, name="minilm")
    assert isinstance(w, EncoderProtocol) and not isinstance(w, SearchProtocol)
    task = local_retrieval_task(data["beir"], instruction=INS)
    task.load_data()
    split = task.dataset["default"]["test"]
    kw = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default")
    # What mteb hands over: DataLoaders of batches (7 does not divide 40: a short last batch).
    docs = w.encode(create_dataloader(split["corpus"], prompt_type=PromptType.document, batch_size=7, **kw),
                    prompt_type=PromptType.document, **kw)
    queries = w.encode(create_dataloader(split["queries"], prompt_type=PromptType.query, batch_size=7, **kw),
                       prompt_type=PromptType.query, **kw)
    corpus, qs, _ = load_beir(data["beir"])
    # documents as nvembed writes them ("title. text"), in order, without instruction; queries with it
    np.testing.assert_allclose(docs, minilm.encode([doc_text(corpus[d]) for d in split["corpus"]["id"]]), atol=1e-5)
    np.testing.assert_allclose(queries, minilm.encode([qs[q] for q in split["queries"]["id"]], instruction=INS),
                               atol=1e-5)
    assert [(c["prompt_type"], c["instruction"], c["n"]) for c in w.calls] == [("document", None, len(corpus)),
                                                                               ("query", INS, len(qs))]
    assert w.embed_dim == 384
    meta = w.mteb_model_meta
    assert meta.name == "nvembed/minilm" and meta.embed_dim == 384 and meta.use_instructions
    assert meta.similarity_fn_name is ScoringFunction.COSINE
    np.testing.assert_allclose(np.asarray(w.similarity(queries, docs)), queries @ docs.T, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w.similarity_pairwise(docs[:3], docs[3:6])),
                               np.sum(docs[:3] * docs[3:6], axis=1), atol=1e-6)

    # Instruction choice: the wrapper's own table, else the task's prompt, else mteb's prompt for the task type.
    sts = local_sts_task(data["sts"]).metadata
    assert w.instruction_for(sts.name, None, sts) == "Retrieve semantically similar text."
    assert MTEBEncoderWrapper(minilm, instructions={sts.name: "x"}).instruction_for(sts.name, None, sts) == "x"
    assert w.instruction_for(task.metadata.name, PromptType.document, task.metadata) is None


@needs_minilm
def test_evaluate_mteb_matches_builtin_evaluators(minilm, data, capsys):
    """The chain: local files -> mteb task classes -> mteb.evaluate through the wrapper (scripts/evaluate.py) gives
    nvembed's own nDCG@10 and Spearman on the same data and encoder."""
    beir, sts = data["beir"], data["sts"]
    assert _evaluate_script().main([str(MINILM), "--mteb", str(beir), str(sts), "--instruction", INS,
                                    "--instructions", "--batch-size", "16"]) == 0
    cap = capsys.readouterr()
    line = json.loads(cap.out.strip().splitlines()[-1])
    assert "mteb adi-small: ndcg_at_10 = " in cap.err
    ndcg = evaluate_retrieval(minilm, beir, instruction=INS)["ndcg@10"]
    spearman = evaluate_sts_file(minilm, sts, instruction=INS)["spearman"]
    assert abs(line["adi-small/ndcg_at_10"] - ndcg) < 1e-3
    assert abs(line["stsb-small/cosine_spearman"] - spearman) < 1e-3
    # The agreement is informative: without the query instruction nvembed's own score moves well past 1e-3.
    assert abs(evaluate_retrieval(minilm, beir, instruction=None)["ndcg@10"] - ndcg) > 5e-3


def test_mteb_task_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Before any model loads (the model path does not exist): hub-only tasks offline, unknown names, bad paths."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    main = errors.cli(_evaluate_script().main)
    (tmp_path / "empty").mkdir()
    cases = [("SciFact", "mteb error: MTEB task 'SciFact': its data (mteb/scifact) could not be loaded"),
             ("SciFactt", "unknown MTEB task 'SciFactt'"),
             (str(tmp_path / "nope"), "no such file or folder"),
             (str(tmp_path / "empty"), "data error: " + str(tmp_path / "empty" / "corpus.jsonl"))]
    for task, msg in cases:
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "no-model"), "--mteb", task])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == errors.EXIT_USER_ERROR and len(err) == 1 and msg in err[0], (task, err)
        assert err[0].startswith("nvembed: ")
