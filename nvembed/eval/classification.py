"""Classification by linear probe: logistic regression (sklearn) on frozen embeddings, accuracy on a test split."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def load_labeled(path, *, max_items: Optional[int] = None, seed: int = 0,
                 max_chars: Optional[int] = None) -> Tuple[List[str], List[str]]:
    """Read a JSONL of ``{"text", "label"}``. ``max_items`` takes a deterministic subset stratified by label
    (round-robin over labels in a seeded random order, so every label is represented when possible)."""
    rows = [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if max_items and len(rows) > max_items:
        rng = random.Random(seed)
        by = defaultdict(list)
        for i, r in enumerate(rows):
            by[str(r["label"])].append(i)
        labels = sorted(by)
        for lab in labels:
            rng.shuffle(by[lab])
        rng.shuffle(labels)
        picked, depth = [], 0
        while len(picked) < max_items:
            progressed = False
            for lab in labels:
                if depth < len(by[lab]) and len(picked) < max_items:
                    picked.append(by[lab][depth])
                    progressed = True
            if not progressed:
                break
            depth += 1
        rows = [rows[i] for i in sorted(picked)]
    texts = [r["text"][:max_chars] if max_chars else r["text"] for r in rows]
    return texts, [str(r["label"]) for r in rows]


def linear_probe(train_emb, train_labels, test_emb, test_labels, *, max_iter: int = 1000, C: float = 1.0,
                 seed: int = 0) -> Dict[str, float]:
    clf = LogisticRegression(max_iter=max_iter, C=C, random_state=seed)
    clf.fit(np.asarray(train_emb), list(train_labels))
    pred = clf.predict(np.asarray(test_emb))
    return {"accuracy": float(accuracy_score(test_labels, pred)),
            "f1_macro": float(f1_score(test_labels, pred, average="macro"))}


def evaluate_classification(encoder, train_texts, train_labels, test_texts, test_labels, *,
                            instruction: Optional[str] = None, batch_size: int = 32, seed: int = 0,
                            show_progress: bool = False) -> Dict[str, float]:
    """Encode both splits with ``instruction`` (NV-Embed treats the classified text as a query) and probe."""
    tr = encoder.encode(list(train_texts), instruction=instruction, batch_size=batch_size,
                        show_progress=show_progress)
    te = encoder.encode(list(test_texts), instruction=instruction, batch_size=batch_size,
                        show_progress=show_progress)
    res = linear_probe(tr, train_labels, te, test_labels, seed=seed)
    res.update({"num_train": len(tr), "num_test": len(te)})
    return res


def evaluate_classification_files(encoder, train_path, test_path, *, instruction: Optional[str] = None,
                                  max_train: Optional[int] = None, max_test: Optional[int] = None,
                                  max_chars: Optional[int] = None, seed: int = 0, batch_size: int = 32,
                                  show_progress: bool = False) -> Dict[str, float]:
    trx, try_ = load_labeled(train_path, max_items=max_train, seed=seed, max_chars=max_chars)
    tex, tey = load_labeled(test_path, max_items=max_test, seed=seed + 1, max_chars=max_chars)
    return evaluate_classification(encoder, trx, try_, tex, tey, instruction=instruction, batch_size=batch_size,
                                   seed=seed, show_progress=show_progress)
