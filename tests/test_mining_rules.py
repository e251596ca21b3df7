"""Positive-aware selection rules on a hand-built case."""

import pytest

from nvembed.mining.rules import MiningRule, select_negatives

# Teacher ranking for one query; positives are ids 0 (0.80) and 1 (0.90): the min positive score is 0.80.
CANDS = [(1, 0.90), (2, 0.85), (0, 0.80), (3, 0.78), (4, 0.765), (5, 0.74), (6, 0.69), (7, 0.65), (8, 0.50),
         (9, 0.30)]
IDS = [i for i, _ in CANDS]
SC = [s for _, s in CANDS]
POS_IDS = [0, 1]
POS_SC = [0.80, 0.90]
# Ranks after removing positives: 0:id2 1:id3 2:id4 3:id5 4:id6 5:id7 6:id8 7:id9


def pick(**kw):
    return select_negatives(IDS, SC, POS_IDS, POS_SC, MiningRule(**kw))[0]


def test_defaults():
    r = MiningRule()
    assert r.rule == "topk_percpos" and r.margin == 0.95
    assert MiningRule(rule="topk_marginpos").margin == 0.05
    assert MiningRule(rule="topk_abs").margin == 0.7
    assert MiningRule(rule="TopK-PercPos").rule == "topk_percpos"
    with pytest.raises(ValueError):
        MiningRule(rule="nope")
    with pytest.raises(ValueError):
        MiningRule(range_min=5, range_max=5)


def test_percpos_uses_min_positive():
    # threshold 0.95 * 0.80 = 0.76 -> keeps ids 5, 6, 7, 8, 9 (id 2 at 0.85 would pass with max pos 0.9 * .95).
    assert pick(range_max=None, num_negatives=10) == [5, 6, 7, 8, 9]
    assert MiningRule().threshold(POS_SC) == pytest.approx(0.76)


def test_percpos_with_range():
    # window ranks [1, 6) -> ids 3, 4, 5, 6, 7; <= 0.76 -> 5, 6, 7; two negatives -> 5, 6
    assert pick(range_min=1, range_max=6, num_negatives=2) == [5, 6]
    ids, scores = select_negatives(IDS, SC, POS_IDS, POS_SC, MiningRule(range_min=1, range_max=6, num_negatives=2))
    assert scores == [0.74, 0.69]


def test_marginpos():
    # threshold 0.80 - 0.03 = 0.77 -> window ids 3..7 keep 4, 5, 6, 7
    assert pick(rule="topk_marginpos", margin=0.03, range_min=1, range_max=6, num_negatives=3) == [4, 5, 6]
    # default margin 0.05 -> 0.75
    assert pick(rule="topk_marginpos", range_max=None, num_negatives=10) == [5, 6, 7, 8, 9]


def test_abs():
    assert pick(rule="topk_abs", range_min=1, range_max=6, num_negatives=4) == [6, 7]
    assert pick(rule="topk_abs", margin=0.8, range_max=None, num_negatives=3) == [3, 4, 5]


def test_naive_topk_and_range():
    assert pick(rule="topk", num_negatives=2) == [2, 3]
    assert pick(rule="topk", range_min=1, range_max=6, num_negatives=2) == [3, 4]
    assert pick(rule="topk", range_min=6, range_max=None, num_negatives=5) == [8, 9]


def test_never_selects_positive_or_excluded():
    for rule in ("topk", "topk_abs", "topk_percpos", "topk_marginpos"):
        ids = pick(rule=rule, margin=10.0 if rule != "topk_percpos" else 2.0, range_max=None, num_negatives=20)
        assert 0 not in ids and 1 not in ids
    ids, _ = select_negatives(IDS, SC, POS_IDS, POS_SC, MiningRule(rule="topk", num_negatives=3), excluded_ids=[2])
    assert ids == [3, 4, 5]


def test_random_sampling_deterministic():
    r = MiningRule(range_max=None, num_negatives=3, sampling="random", seed=7)
    a = select_negatives(IDS, SC, POS_IDS, POS_SC, r, query_index=3)[0]
    b = select_negatives(IDS, SC, POS_IDS, POS_SC, r, query_index=3)[0]
    assert a == b and len(a) == 3 and set(a) <= {5, 6, 7, 8, 9}
    seen = {tuple(select_negatives(IDS, SC, POS_IDS, POS_SC, r, query_index=q)[0]) for q in range(20)}
    assert len(seen) > 1  # differs across queries
