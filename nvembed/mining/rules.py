"""Positive-aware hard-negative selection rules (NV-Retriever, arXiv 2407.15831; used by NV-Embed-v2).

Given one query's teacher-ranked candidates and its positives' teacher scores, keep candidates that are *hard*
(highly ranked) but unlikely to be false negatives (score clearly below the positives):

* ``topk_percpos`` (default, NV-Embed-v2): keep ``score <= margin * pos_ref``; ``margin`` default 0.95.
* ``topk_marginpos``: keep ``score <= pos_ref - margin``; ``margin`` default 0.05.
* ``topk_abs``: keep ``score <= margin``; ``margin`` default 0.7.
* ``topk``: no threshold (naive top-k, for ablations).

``pos_ref`` is the **minimum** teacher score over the query's positives: with several positives the threshold is
relative to the weakest one, the conservative choice (it removes every candidate that scores like any positive).
A threshold is inclusive (a candidate scoring exactly at it is kept).

Candidate range: ranks are 0-based positions in the teacher's ranking of the corpus *with the positives removed*;
only ranks in ``[range_min, range_max)`` are considered (``range_max=None``: no upper bound). Positives (by id,
and any candidate whose text equals a positive's) are never selected.

Sampling: ``sampling="top"`` takes the ``num_negatives`` highest-scoring kept candidates (NV-Retriever);
``"random"`` draws them uniformly from the kept candidates with ``numpy.random.default_rng([seed, query_index])``,
so the result is deterministic per query and independent of chunking/order of processing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_MARGINS = {"topk_percpos": 0.95, "topk_marginpos": 0.05, "topk_abs": 0.7, "topk": None}
_ALIASES = {"percpos": "topk_percpos", "topk-percpos": "topk_percpos", "marginpos": "topk_marginpos",
            "topk-marginpos": "topk_marginpos", "abs": "topk_abs", "topk-abs": "topk_abs", "naive": "topk"}


@dataclass
class MiningRule:
    rule: str = "topk_percpos"
    margin: Optional[float] = None
    """Rule parameter; None = the rule's default (0.95 / 0.05 / 0.7)."""
    range_min: int = 0
    range_max: Optional[int] = 50
    num_negatives: int = 4
    sampling: str = "top"
    seed: int = 42

    def __post_init__(self):
        r = self.rule.lower().replace(" ", "")
        self.rule = _ALIASES.get(r, r)
        if self.rule not in DEFAULT_MARGINS:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {sorted(DEFAULT_MARGINS)}")
        if self.margin is None:
            self.margin = DEFAULT_MARGINS[self.rule]
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be 'top' or 'random', not {self.sampling!r}")
        if self.range_min < 0 or (self.range_max is not None and self.range_max <= self.range_min):
            raise ValueError(f"bad range [{self.range_min}, {self.range_max})")
        if self.num_negatives < 1:
            raise ValueError("num_negatives must be >= 1")

    def threshold(self, positive_scores: Sequence[float]) -> float:
        """Maximum allowed negative score for a query with these positive scores (inclusive)."""
        if self.rule == "topk":
            return float("inf")
        if self.rule == "topk_abs":
            return float(self.margin)
        if len(positive_scores) == 0:
            raise ValueError(f"{self.rule} needs at least one positive score")
        ref = float(np.min(positive_scores))
        if self.rule == "topk_percpos":
            return ref * float(self.margin)
        return ref - float(self.margin)

    def to_dict(self) -> dict:
        return asdict(self)


def select_negatives(cand_ids: Sequence[int], cand_scores: Sequence[float], positive_ids: Iterable[int],
                     positive_scores: Sequence[float], rule: MiningRule, *, query_index: int = 0,
                     excluded_ids: Iterable[int] = ()) -> Tuple[List[int], List[float]]:
    """Pick negatives for one query.

    Args:
        cand_ids / cand_scores: the teacher's candidates sorted by descending score (may contain positives).
        positive_ids: corpus ids of the positives (removed before ranks are counted).
        positive_scores: teacher scores of the positives (threshold reference: their minimum).
        excluded_ids: other ids never to select and not counted in ranks (e.g. duplicates of a positive's text).
    Returns:
        ``(ids, scores)`` of at most ``rule.num_negatives`` negatives, by descending score.
    """
    banned = set(int(i) for i in positive_ids) | set(int(i) for i in excluded_ids)
    ranked = [(int(i), float(s)) for i, s in zip(cand_ids, cand_scores) if int(i) not in banned and int(i) >= 0]
    hi = len(ranked) if rule.range_max is None else min(rule.range_max, len(ranked))
    window = ranked[rule.range_min:hi]
    thr = rule.threshold(positive_scores)
    kept = [(i, s) for i, s in window if s <= thr]
    if rule.sampling == "random" and len(kept) > rule.num_negatives:
        rng = np.random.default_rng([int(rule.seed), int(query_index)])
        pick = sorted(rng.choice(len(kept), size=rule.num_negatives, replace=False).tolist())
        kept = [kept[p] for p in pick]
    else:
        kept = kept[: rule.num_negatives]
    return [i for i, _ in kept], [s for _, s in kept]
