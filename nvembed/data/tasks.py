"""Task conversions: rows of one spec -> (query, positive, negatives) Examples, following NV-Embed §4.2.

A *unit* is one potential example: a retrieval row, a classification/clustering row, or one side of an STS pair.
Only numpy arrays live in memory (unit indices and, for labelled tasks, one label code per row); the rows stay in the
memory-mapped data cache (:mod:`.sources`) and a batch fetches the few it needs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow.compute as pc

from .corpus import Corpus
from .example import Example
from .sources import normalize, open_source
from .spec import DataSpec, SpecError

_TRIES = 20  # rejection-sampling attempts before accepting a duplicate filler


class TaskData:
    def __init__(self, spec: DataSpec, log: Callable[[str], None] = print):
        self.spec, self.log = spec, log
        self.stats: Dict[str, Any] = {"rows_read": 0, "rows_skipped": 0, "skipped": Counter(), "filtered": Counter(),
                                      "examples": 0, "negatives_filled": 0}
        self.scored = bool(spec.fields.positive_scores)
        if self.scored:  # examples left without teacher scores because random fillers have none
            self.stats["unscored_examples"] = 0
        self._logged = 0
        # the corpus first: the rows' document ids are checked against it while the rows are read
        self.corpus = Corpus(spec) if spec.source.corpus else None
        self.source = open_source(spec, self._bad, self.corpus)
        self.stats["rows_read"] = self.source.rows_read  # rows left out while reading count as read
        rows = np.arange(len(self.source), dtype=np.int64)  # the cache holds the valid rows only
        if spec.max_examples is not None and len(rows) > spec.max_examples:
            # a fixed-seed sample, not the head: sources are often sorted by label
            keep = np.sort(np.random.default_rng(0).choice(len(rows), spec.max_examples, replace=False))
            self.stats["filtered"]["over max_examples"] += len(rows) - len(keep)
            rows = rows[keep]
        self.rows = rows
        self.units = self._build_units(rows)
        self.stats["examples"] = len(self.units)
        if len(self.units) == 0:
            raise SpecError(f"{spec.path}: no usable examples ({self.summary()})")

    # -- errors -----------------------------------------------------------------------------------------------
    def _bad(self, where: Optional[str], why: str, count: int = 1) -> None:
        """A row left out: raise (on_error: raise), else count it; ``where`` is None for rows counted in bulk."""
        if self.spec.on_error == "raise":
            raise SpecError(f"{where}: {why} (spec {self.spec.path}; set on_error: skip to skip and count such rows)")
        self.stats["rows_skipped"] += count
        self.stats["skipped"][why] += count
        if where is not None and self._logged < 5:  # every skip is counted; the first few are shown in full
            self.log(f"[data] {self.spec.name}: skipped {where}: {why}")
            self._logged += 1

    def summary(self) -> str:
        s = self.stats
        parts = [f"rows read {s['rows_read']}", f"examples {s['examples']}", f"skipped {s['rows_skipped']}"]
        parts += [f"{why}: {n}" for why, n in list(s["skipped"].items()) + list(s["filtered"].items()) if n]
        return ", ".join(parts)

    # -- units ------------------------------------------------------------------------------------------------
    def _build_units(self, rows: np.ndarray) -> np.ndarray:
        task, spec = self.spec.task, self.spec
        if task == "retrieval":
            return rows
        if task == "sts":
            scores = self.source.column("score").to_numpy()[rows]
            ok = rows[scores >= spec.min_score]
            if len(ok) < len(rows):
                self.stats["filtered"][f"score < {spec.min_score:g}"] += int(len(rows) - len(ok))
            # each kept pair gives two units: (row, side 0) and (row, side 1)
            return (ok[:, None] * 2 + np.arange(2)[None, :]).reshape(-1)
        # class codes in sorted label order, computed in Arrow: one int per row, no Python object per row
        labels = self.source.column("label")
        all_names = pc.unique(labels)
        all_names = all_names.take(pc.sort_indices(all_names))
        all_codes = pc.index_in(labels, value_set=all_names).to_numpy(zero_copy_only=False).astype(np.int64)
        used, codes = np.unique(all_codes[rows], return_inverse=True)
        codes = codes.reshape(-1)
        names = all_names.take(used).to_pylist() if len(used) else []
        if len(names) < 2:
            raise SpecError(f"{spec.path}: {task} needs at least 2 classes, found {len(names)}")
        self.row_codes = np.full(len(self.source), -1, dtype=np.int64)
        self.row_codes[rows] = codes
        order = np.argsort(codes, kind="stable")  # each class's rows, in row order
        ends = np.cumsum(np.bincount(codes, minlength=len(names)))
        self.code_rows = [rows[order[a:b]] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
        # a class's readable text: the first non-empty label_text of its rows
        lt = self.source.column("label_text")
        has_text = pc.fill_null(pc.greater(pc.utf8_length(lt), 0), False).to_numpy(zero_copy_only=False)[rows]
        first_codes, first_at = np.unique(codes[has_text], return_index=True)
        firsts = rows[has_text][first_at]
        texts = dict(zip(first_codes.tolist(), (r["label_text"] for r in self.source.fetch(firsts))))
        self.label_texts = [spec.label_texts.get(n) or texts.get(c) or n.replace("_", " ")
                            for c, n in enumerate(names)]
        # binary tasks always use label texts (NV-Embed §4.2); multi-class follows label_mode
        self.by_label = spec.label_mode == "label" or len(names) == 2
        if self.by_label:
            return rows
        sizes = np.bincount(codes, minlength=len(names))
        ok = rows[sizes[codes] >= 2]
        if len(ok) < len(rows):
            self.stats["filtered"]["only example of its class"] += int(len(rows) - len(ok))
        return ok

    # -- examples ---------------------------------------------------------------------------------------------
    def make(self, units: Sequence[int], rngs: Sequence[np.random.Generator], n_neg: int) -> List[Example]:
        task = self.spec.task
        row_ids = [int(u) // 2 if task == "sts" else int(u) for u in units]
        rows = self.source.fetch(row_ids)
        out = []
        for u, rid, row, rng in zip(units, row_ids, rows, rngs):
            teacher = None
            if task == "retrieval":
                q, pos, negs, teacher = self._retrieval(row, rng, n_neg)
            elif task == "sts":
                side = int(u) % 2
                q, pos = (row["text1"], row["text2"]) if side == 0 else (row["text2"], row["text1"])
                negs = self._fill([], n_neg, {q, pos}, rng)
            else:
                q, pos, negs = self._labelled(rid, row, rng, n_neg)
            out.append(Example(query=q, positive=pos, negatives=negs,
                               instruction=row.get("instruction") or self.spec.instruction,
                               symmetric=self.spec.is_symmetric, dataset=self.spec.name, teacher_scores=teacher))
        return out

    def _retrieval(self, row: Dict[str, Any], rng: np.random.Generator, n_neg: int):
        pos_texts = list(row["positives"])
        if row["positive_ids"]:
            pos_texts += self.corpus.texts(row["positive_ids"])
        i_pos = int(rng.integers(len(pos_texts)))
        own = list(row["negatives"])
        if row["negative_ids"]:
            own += self.corpus.texts(row["negative_ids"])
        # scores travel with their texts through de-duplication (first occurrence wins) and subsampling;
        # the spec allows one text column per side, so scores align with pos_texts / own as built above
        scores = row["negative_scores"] if self.scored else [None] * len(own)
        kept: Dict[str, Any] = {}
        for t, sc in zip(own, scores):
            if t not in kept and t not in pos_texts:
                kept[t] = sc
        own = list(kept)
        cap = n_neg if self.spec.num_hard_negatives is None else min(n_neg, self.spec.num_hard_negatives)
        if len(own) > cap:
            own = [own[i] for i in sorted(rng.choice(len(own), cap, replace=False))]
        negs = self._fill(own, n_neg, set(pos_texts) | {row["query"]}, rng)
        teacher = None
        if self.scored:
            # random fillers have no teacher score: such an example gets none at all (the trainer then leaves it
            # out of the distillation term) rather than made-up scores for the fillers
            if len(own) >= n_neg:
                teacher = [float(row["positive_scores"][i_pos])] + [float(kept[t]) for t in negs]
            else:
                self.stats["unscored_examples"] += 1
        return row["query"], pos_texts[i_pos], negs, teacher

    def _random_docs(self, k: int, rng: np.random.Generator) -> List[str]:
        """k random documents of this dataset: corpus entries, else positives/texts of random rows."""
        if self.corpus is not None:
            return self.corpus.texts_at(rng.integers(len(self.corpus), size=k).tolist())
        picks = self.rows[rng.integers(len(self.rows), size=k)].tolist()
        out = []
        for r in self.source.fetch(picks):
            if self.spec.task == "retrieval":
                out.append(r["positives"][int(rng.integers(len(r["positives"])))] if r["positives"]
                           else r["query"])
            elif self.spec.task == "sts":
                out.append(r["text1"] if rng.integers(2) == 0 else r["text2"])
            else:
                out.append(r["text"])
        return out

    def _fill(self, negs: List[str], n_neg: int, avoid: set, rng: np.random.Generator) -> List[str]:
        need = n_neg - len(negs)
        if need <= 0:
            return negs[:n_neg]
        self.stats["negatives_filled"] += need
        out, seen = list(negs), set(negs) | avoid
        for _ in range(_TRIES):
            for t in self._random_docs(need - (len(out) - len(negs)), rng):
                if t not in seen:
                    out.append(t)
                    seen.add(t)
            if len(out) == n_neg:
                return out
        while len(out) < n_neg:  # tiny datasets: accept repeats rather than fail
            out.extend(self._random_docs(n_neg - len(out), rng))
        return out

    def _labelled(self, rid: int, row: Dict[str, Any], rng: np.random.Generator, n_neg: int):
        code = int(self.row_codes[rid])
        if self.by_label:
            others = [t for c, t in enumerate(self.label_texts) if c != code]
            take = [others[i] for i in rng.permutation(len(others))[:n_neg]]
            if len(take) < n_neg:  # fewer other labels than negatives: repeat them, and say so in stats
                self.stats["negatives_filled"] += n_neg - len(take)
                take += [others[i % len(others)] for i in range(n_neg - len(take))]
            return row["text"], self.label_texts[code], take
        same = self.code_rows[code]
        pos_row = rid
        while pos_row == rid:
            pos_row = int(same[rng.integers(len(same))])
        neg_rows: List[int] = []
        for _ in range(n_neg * _TRIES):
            if len(neg_rows) == n_neg:
                break
            r = int(self.rows[rng.integers(len(self.rows))])
            if self.row_codes[r] != code and r not in neg_rows:
                neg_rows.append(r)
        while len(neg_rows) < n_neg:  # pathological class balance: allow repeats
            r = int(self.rows[rng.integers(len(self.rows))])
            if self.row_codes[r] != code:
                neg_rows.append(r)
        texts = [r["text"] for r in self.source.fetch([pos_row] + neg_rows)]
        return row["text"], texts[0], texts[1:]


def open_task(spec: DataSpec, log: Callable[[str], None] = print) -> TaskData:
    return TaskData(spec, log)


__all__ = ["TaskData", "open_task", "normalize"]
