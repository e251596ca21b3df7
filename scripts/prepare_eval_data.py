#!/usr/bin/env python
"""Convert the raw evaluation collections in ``../shared/data`` into the repo's eval format.

Writes under ``data_specs/eval/`` (paths relative to the repo root):

* ``beir/{cisi,cranfield,med,adi}/``: BEIR folders (``corpus.jsonl`` with ``_id/title/text``, ``queries.jsonl`` with
  ``_id/text``, ``qrels/test.tsv`` with header ``query-id corpus-id score``); only queries that have judgments.
* ``sts/stsbenchmark-test.jsonl``: ``{"sentence1", "sentence2", "score"}`` (official test split).
* ``classification/<name>/{train,test}.jsonl``: ``{"text", "label"}``.
* ``clustering/<name>.jsonl``: ``{"text", "label"}``.

Every choice (Cranfield query numbering, relevance grades, splits) is recorded in ``data_specs/eval/ATTRIBUTION.md``.
Deterministic: running it twice gives byte-identical files.

    python scripts/prepare_eval_data.py [--shared ../shared/data] [--out data_specs/eval]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
_TAG = re.compile(r"^\.([A-Z])(?:\s+(\S+))?\s*$")
SPLIT_SEED = 20240601


def read_text(path: Path, encoding: str = "utf-8") -> str:
    with open(path, "rb") as f:
        raw = f.read()
    return raw.decode(encoding, errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def parse_smart(path: Path) -> List[Tuple[str, Dict[str, str]]]:
    """Parse a SMART tagged file (``.I id`` then ``.T/.A/.W/...`` fields) into ``[(id, {field: text})]``."""
    records: List[Tuple[str, Dict[str, str]]] = []
    cur_id, fields, field = None, {}, None
    for line in read_text(path).split("\n"):
        m = _TAG.match(line)
        if m and m.group(1) == "I" and m.group(2):
            if cur_id is not None:
                records.append((cur_id, fields))
            cur_id, fields, field = m.group(2), {}, None
            continue
        if m and m.group(2) is None:
            field = m.group(1)
            fields.setdefault(field, "")
            continue
        if field is not None:
            fields[field] += line.strip() + " "
    if cur_id is not None:
        records.append((cur_id, fields))
    return [(i, {k: " ".join(v.split()) for k, v in f.items()}) for i, f in records]


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_beir(out: Path, corpus, queries, qrels: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    judged = {q for q, d in qrels.items() if any(s > 0 for s in d.values())}
    qrels = {q: {d: s for d, s in docs.items() if s > 0} for q, docs in qrels.items() if q in judged}
    doc_ids = {d for d, _ in corpus}
    missing = sum(1 for docs in qrels.values() for d in docs if d not in doc_ids)
    qrels = {q: {d: s for d, s in docs.items() if d in doc_ids} for q, docs in qrels.items()}
    write_jsonl(out / "corpus.jsonl", ({"_id": d, "title": t, "text": x} for d, (t, x) in corpus))
    nq = write_jsonl(out / "queries.jsonl", ({"_id": q, "text": t} for q, t in queries if q in qrels))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    n_j = 0
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, _ in queries:
            for d, s in sorted(qrels.get(q, {}).items(), key=lambda x: int(x[0])):
                f.write(f"{q}\t{d}\t{s}\n")
                n_j += 1
    return {"docs": len(corpus), "queries": nq, "judgments": n_j, "judgments_unknown_doc": missing}


def _corpus(recs, title_field="T", text_fields=("W",)):
    out = []
    for i, f in recs:
        text = " ".join(f.get(k, "") for k in text_fields).strip()
        out.append((str(int(i)), (f.get(title_field, ""), text)))
    return out


def prepare_ir(shared: Path, out: Path) -> Dict[str, Dict[str, int]]:
    stats = {}
    # CISI: queries use .W only (55 queries also carry .T/.A/.B of a source paper); qrels `qid docid 0 0.0` = relevant.
    c = shared / "cisi"
    corpus = _corpus(parse_smart(c / "CISI.ALL"))
    queries = [(str(int(i)), f.get("W", "")) for i, f in parse_smart(c / "CISI.QRY")]
    qrels: Dict[str, Dict[str, int]] = defaultdict(dict)
    for line in read_text(c / "CISI.REL").split("\n"):
        p = line.split()
        if len(p) >= 2:
            qrels[str(int(p[0]))][str(int(p[1]))] = 1
    stats["cisi"] = write_beir(out / "beir" / "cisi", corpus, queries, qrels)

    # Cranfield: qrels number queries 1..225 by POSITION in cran.qry; grades 1 (complete answer) .. 4 (minimum
    # interest) -> gain 5 - grade (4..1); grade -1 dropped (one per query, not a relevance grade).
    c = shared / "cranfield"
    corpus = _corpus(parse_smart(c / "cran.all.1400"))
    qrecs = parse_smart(c / "cran.qry")
    queries = [(str(pos + 1), f.get("W", "")) for pos, (_, f) in enumerate(qrecs)]
    qrels = defaultdict(dict)
    for line in read_text(c / "cranqrel").split("\n"):
        p = line.split()
        if len(p) >= 3 and 1 <= int(p[2]) <= 4:
            qrels[str(int(p[0]))][str(int(p[1]))] = 5 - int(p[2])
    stats["cranfield"] = write_beir(out / "beir" / "cranfield", corpus, queries, qrels)

    # MED: `qid 0 docid 1`.
    c = shared / "med"
    corpus = _corpus(parse_smart(c / "MED.ALL"))
    queries = [(str(int(i)), f.get("W", "")) for i, f in parse_smart(c / "MED.QRY")]
    qrels = defaultdict(dict)
    for line in read_text(c / "MED.REL").split("\n"):
        p = line.split()
        if len(p) >= 4 and int(p[3]) > 0:
            qrels[str(int(p[0]))][str(int(p[2]))] = 1
    stats["med"] = write_beir(out / "beir" / "med", corpus, queries, qrels)

    # ADI: `qid docid 0 0.0` like CISI.
    c = shared / "adi"
    corpus = _corpus(parse_smart(c / "ADI.ALL"))
    queries = [(str(int(i)), f.get("W", "")) for i, f in parse_smart(c / "ADI.QRY")]
    qrels = defaultdict(dict)
    for line in read_text(c / "ADI.REL").split("\n"):
        p = line.split()
        if len(p) >= 2:
            qrels[str(int(p[0]))][str(int(p[1]))] = 1
    stats["adi"] = write_beir(out / "beir" / "adi", corpus, queries, qrels)
    return stats


def prepare_sts(shared: Path, out: Path) -> int:
    rows = []
    with open(shared / "stsbenchmark" / "sts-test.csv", encoding="utf-8", newline="") as f:
        for p in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(p) >= 7:
                rows.append({"sentence1": p[5], "sentence2": p[6], "score": float(p[4])})
    return write_jsonl(out / "sts" / "stsbenchmark-test.jsonl", rows)


def _split_half(items: List[dict], seed: int) -> Tuple[List[dict], List[dict]]:
    """Deterministic stratified 50/50 split (per label: shuffle with ``seed``, first half train)."""
    by_label = defaultdict(list)
    for it in items:
        by_label[it["label"]].append(it)
    train, test = [], []
    for lab in sorted(by_label):
        group = by_label[lab]
        random.Random(f"{seed}-{lab}").shuffle(group)
        h = len(group) // 2
        train += group[:h]
        test += group[h:]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(test)
    return train, test


def prepare_classification(shared: Path, out: Path) -> Dict[str, Dict[str, int]]:
    stats = {}
    for name, folder, pos, neg in [("mpqa", "mpqa", "mpqa.pos", "mpqa.neg"),
                                   ("cr", "cr-custrev", "custrev.pos", "custrev.neg")]:
        items = []
        for fn, lab in ((pos, "positive"), (neg, "negative")):
            for line in read_text(shared / folder / fn, "latin-1").split("\n"):
                if line.strip():
                    items.append({"text": line.strip(), "label": lab})
        tr, te = _split_half(items, SPLIT_SEED)
        stats[name] = {"train": write_jsonl(out / "classification" / name / "train.jsonl", tr),
                       "test": write_jsonl(out / "classification" / name / "test.jsonl", te)}

    def read_banking(fn):
        with open(shared / "banking77" / fn, encoding="utf-8", newline="") as f:
            return [{"text": r["text"], "label": r["category"]} for r in csv.DictReader(f)]

    train = read_banking("train.csv")
    # Keep a fixed per-class subset of the official train split (20 per class) to stay small; test is complete.
    by = defaultdict(list)
    for r in train:
        by[r["label"]].append(r)
    sub = []
    for lab in sorted(by):
        g = list(by[lab])
        random.Random(f"{SPLIT_SEED}-{lab}").shuffle(g)
        sub += g[:20]
    random.Random(SPLIT_SEED).shuffle(sub)
    stats["banking77"] = {"train": write_jsonl(out / "classification" / "banking77" / "train.jsonl", sub),
                          "test": write_jsonl(out / "classification" / "banking77" / "test.jsonl",
                                              read_banking("test.csv"))}
    return stats


def prepare_clustering(shared: Path, out: Path) -> Dict[str, int]:
    names = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
    rows = []
    with open(shared / "ag-news" / "test.csv", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            desc = r["description"].replace("\\", " ").strip()
            rows.append({"text": f"{r['title'].strip()}. {desc}", "label": names[r["label"]]})
    stats = {"ag-news": write_jsonl(out / "clustering" / "ag-news.jsonl", rows)}
    rows = []
    for line in read_text(shared / "trec-qc" / "TREC.test", "latin-1").split("\n"):
        if line.strip():
            lab, text = line.split(" ", 1)
            rows.append({"text": text.strip(), "label": lab.split(":")[0]})
    stats["trec-qc"] = write_jsonl(out / "clustering" / "trec-qc.jsonl", rows)
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="raw data folder (../shared/data)")
    ap.add_argument("--out", default=str(REPO / "data_specs" / "eval"))
    a = ap.parse_args(argv)
    shared, out = Path(a.shared), Path(a.out)
    stats = {"ir": prepare_ir(shared, out), "sts": prepare_sts(shared, out),
             "classification": prepare_classification(shared, out), "clustering": prepare_clustering(shared, out)}
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
