"""Length bucketing: run one padded batch as a few sub-batches of similar length, each padded to its own longest text.

A contrastive batch pads every text to the longest one; with real length spreads a third or more of the computed
tokens can be padding. The rows are sorted by real length and cut into at most ``max_buckets`` runs where the cuts
save the most padded tokens (an exact dynamic programme over the sorted lengths), a cut being worth making only when
it saves more than ``overhead_tokens``. The embeddings are those of the unsplit batch (padding is masked and positions
come from the attention mask), returned in the original row order; autograd, DDP and DeepSpeed see ordinary module
calls, so gradients are unchanged too.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
import torch


def plan_buckets(lengths: List[int], max_buckets: int, overhead_tokens: int = 0,
                 exact: bool = False) -> List[List[int]]:
    """Row indices grouped into at most ``max_buckets`` buckets (each sorted by length) minimising
    ``sum(rows x longest) + overhead_tokens x buckets``. ``exact``: always ``min(max_buckets, rows)`` buckets, so
    the number of model calls does not depend on the data (ZeRO-3 ranks must issue the same collectives)."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    k_max = max(1, min(max_buckets, n))
    if k_max == 1:
        return [order]
    srt = np.asarray([lengths[i] for i in order], dtype=np.float64)
    # cost[i, j]: rows order[i:j] as one bucket = (j - i) * longest = (j - i) * srt[j - 1]
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    last = np.concatenate([[0.0], srt])[None, :]  # srt[j - 1]
    cost = np.where(i < j, (j - i) * last + overhead_tokens, np.inf)
    best = cost[0].copy()  # best[j]: first j rows in exactly one bucket
    choice = [np.zeros(n + 1, dtype=np.int64)]
    totals = [best[n]]
    for _ in range(1, k_max):
        cand = best[:, None] + cost  # [i, j]: first i rows in k-1 buckets, rows i..j-1 in one
        arg = cand.argmin(axis=0)
        best = cand[arg, np.arange(n + 1)]
        choice.append(arg)
        totals.append(best[n])
    # fewest buckets among equal costs (argmin takes the first)
    k = k_max - 1 if exact else int(np.argmin(totals))
    cuts, end = [], n
    for level in range(k, 0, -1):
        start = int(choice[level][end])
        cuts.append((start, end))
        end = start
    cuts.append((0, end))
    return [order[s:e] for s, e in reversed(cuts)]


def select_rows(features: Dict[str, torch.Tensor], rows: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The given rows, cut to the columns any of them uses (works for right and left padding)."""
    sub = {k: v.index_select(0, rows.to(v.device)) for k, v in features.items()}
    used = sub["attention_mask"].any(dim=0).nonzero().flatten()
    lo, hi = int(used[0]), int(used[-1]) + 1
    return {k: v[:, lo:hi] for k, v in sub.items()}


def restore_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in ``order`` (row i of ``x`` is original row ``order[i]``) back in the original order."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return x.index_select(0, inverse.to(x.device))


def bucketed_forward(fn: Callable[..., torch.Tensor], features: Dict[str, torch.Tensor], max_buckets: int,
                     overhead_tokens: int = 0, exact: bool = False) -> torch.Tensor:
    """``fn(**features)`` computed bucket by bucket; rows of the result in the order of ``features``."""
    mask = features["attention_mask"]
    if max_buckets <= 1 or mask.shape[0] <= 1:
        return fn(**features)
    lengths = mask.sum(dim=1).tolist()
    plan = plan_buckets(lengths, max_buckets, overhead_tokens, exact)
    if len(plan) == 1 and max(lengths) == mask.shape[1]:
        return fn(**features)
    order = torch.tensor([r for rows in plan for r in rows], dtype=torch.long, device=mask.device)
    outs, start = [], 0
    for rows in plan:
        outs.append(fn(**select_rows(features, order[start:start + len(rows)])))
        start += len(rows)
    return restore_order(torch.cat(outs), order)


def padded_tokens(features: Dict[str, torch.Tensor], max_buckets: int, overhead_tokens: int = 0) -> int:
    """Tokens (padding included) the backbone computes for ``features`` under this bucketing."""
    mask = features["attention_mask"]
    if max_buckets <= 1 or mask.shape[0] <= 1:
        return int(mask.numel())
    lengths = mask.sum(dim=1).tolist()
    return int(sum(len(rows) * max(lengths[r] for r in rows)
                   for rows in plan_buckets(lengths, max_buckets, overhead_tokens)))
