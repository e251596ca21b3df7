#!/usr/bin/env python
"""Convert the public data sets in ../shared/data into the small demo TRAINING files under data_specs/demo/files/.

Deterministic (no clock, fixed seeds, hash-based splits), so re-running reproduces the committed files byte for byte:

    python scripts/prepare_demo_data.py [--shared ../shared/data] [--out data_specs/demo/files]

Only training material is written. Evaluation data (ag-news, mpqa, cr, the IR collections, every test split and
the held-out MedQuAD focuses) is left for the evaluation suites.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDQUAD_MAX_PAIRS = 2000
MEDQUAD_ANSWER_CHARS = 1200
MEDQUAD_NEGATIVES = 3
BANKING77_MAX = 4000
csv.field_size_limit(1 << 24)


def _h(s: str) -> int:
    return int(hashlib.md5(s.encode("utf-8")).hexdigest(), 16)


def medquad_is_train(focus: str) -> bool:
    """Split by focus (the topic of an XML file), ~80% train: all QAs about one topic fall on one side."""
    return _h(focus.strip().lower()) % 5 != 0


def _clean(text: str) -> str:
    return " ".join(text.split())


def _truncate(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    cut = text[:n]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows)


def medquad(shared: Path, out: Path) -> str:
    docs = []  # (focus, file, [(qid, question, answer)])
    for xml in sorted((shared / "medquad").glob("*/*.xml")):
        root = ET.parse(xml).getroot()
        focus = _clean(root.findtext("Focus") or xml.stem)
        pairs = []
        for qa in root.iter("QAPair"):
            q, a = qa.find("Question"), qa.find("Answer")
            question = _clean(q.text or "") if q is not None else ""
            answer = _clean(a.text or "") if a is not None else ""
            if question and answer:
                pairs.append((q.get("qid") or f"{xml.stem}-{len(pairs)}", question,
                              _truncate(answer, MEDQUAD_ANSWER_CHARS)))
        if pairs:
            docs.append((focus, xml.relative_to(shared / "medquad").as_posix(), pairs))
    train_focuses = sorted({d[0] for d in docs if medquad_is_train(d[0])}, key=_h)
    by_focus = defaultdict(list)
    for d in docs:
        by_focus[d[0]].append(d)
    corpus, queries, n = [], [], 0
    for focus in train_focuses:  # whole focuses in hash order until the size cap
        if n >= MEDQUAD_MAX_PAIRS:
            break
        for _, fname, pairs in by_focus[focus]:
            # upstream qids are not unique (they repeat across subsets and files): key by file and position
            stem = fname.split("_", 1)[0] + "-" + Path(fname).stem
            ids = [f"medquad-{stem}-{k + 1}" for k in range(len(pairs))]
            for doc_id, (qid, question, answer) in zip(ids, pairs):
                corpus.append({"id": doc_id, "text": answer, "focus": focus})
                # other answers about the same focus: topical hard negatives
                negs = [i for i in ids if i != doc_id][:MEDQUAD_NEGATIVES]
                queries.append({"id": qid, "question": question, "answer_id": doc_id, "negative_ids": negs,
                                "source_file": fname})
                n += 1
    # drop negatives whose answer text equals the positive (duplicated boilerplate answers)
    text_of = {c["id"]: c["text"] for c in corpus}
    for q in queries:
        q["negative_ids"] = [i for i in q["negative_ids"] if text_of[i] != text_of[q["answer_id"]]]
    write_jsonl(out / "medquad_corpus.jsonl", corpus)
    write_jsonl(out / "medquad_train.jsonl", queries)
    return f"medquad: {len(queries)} queries, {len(corpus)} corpus docs from {len(train_focuses)} train focuses"


def qnli(shared: Path, out: Path) -> str:
    groups: dict = {}
    with (shared / "qnli-dev" / "dev.tsv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            g = groups.setdefault(row["question"], {"id": f"qnli-{row['index']}", "question": row["question"],
                                                     "positives": [], "negatives": []})
            (g["positives"] if row["label"] == "entailment" else g["negatives"]).append(row["sentence"])
    rows = [g for g in groups.values() if g["positives"]]
    write_jsonl(out / "qnli_train.jsonl", rows)
    return f"qnli: {len(rows)} questions with a positive (of {len(groups)})"


def stsb(shared: Path, out: Path) -> str:
    rows = []
    with (shared / "stsbenchmark" / "sts-train.csv").open(encoding="utf-8", newline="") as f:
        for cells in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            genre, file, year, sid, score, s1, s2 = cells[:7]  # some lines carry extra trailing fields
            rows.append({"id": f"{file}-{year}-{sid}", "genre": genre, "text1": s1, "text2": s2,
                         "score": float(score)})
    write_jsonl(out / "stsb_train.jsonl", rows)
    return f"stsbenchmark: {len(rows)} train pairs"


def banking77(shared: Path, out: Path) -> str:
    by_label = defaultdict(list)
    with (shared / "banking77" / "train.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(row["text"])
    per = -(-BANKING77_MAX // len(by_label))
    rng = random.Random(77)
    rows = []
    for label in sorted(by_label):  # a stratified sample keeps every intent
        texts = by_label[label]
        for t in sorted(rng.sample(texts, min(per, len(texts)))):
            rows.append({"text": t, "label": label})
    rng.shuffle(rows)
    write_jsonl(out / "banking77_train.jsonl", rows[:BANKING77_MAX])
    return f"banking77: {min(len(rows), BANKING77_MAX)} of {sum(map(len, by_label.values()))} train rows"


def trec(shared: Path, out: Path) -> str:
    rows = []
    text = (shared / "trec-qc" / "TREC.train").read_bytes().decode("latin-1")
    for line in text.splitlines():
        if not line.strip():
            continue
        label, question = line.split(" ", 1)
        coarse, fine = label.split(":", 1)
        rows.append({"text": question.strip(), "coarse": coarse, "fine": f"{coarse}:{fine}"})
    write_jsonl(out / "trec_train.jsonl", rows)
    return f"trec-qc: {len(rows)} train questions"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT / ".." / "shared" / "data"), help="folder of the shared data sets")
    ap.add_argument("--out", default=str(ROOT / "data_specs" / "demo" / "files"))
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    for fn in (medquad, qnli, stsb, banking77, trec):
        print(fn(shared, out))
    total = sum(p.stat().st_size for p in out.glob("*.jsonl"))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
