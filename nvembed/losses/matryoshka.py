"""Matryoshka wrapper: the base loss on the full embedding plus on its first d dimensions for each d.

Truncated embeddings are re-normalised before scoring, as at inference. The result is the mean over the full
embedding and every truncation (equal weights). Reference: Kusupati et al. 2022; Gecko (arXiv 2403.20327) trains
768 and 256 dims this way.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from .infonce import LossOutput


class MatryoshkaLoss(nn.Module):
    def __init__(self, base: nn.Module, dims: Sequence[int]):
        super().__init__()
        self.base = base
        self.dims = sorted(set(int(d) for d in dims), reverse=True)

    def forward(self, queries, docs, group, offset=0, pos_keys=None, doc_keys=None) -> LossOutput:
        full = self.base(queries, docs, group, offset, pos_keys, doc_keys)
        total, n = full.loss, 1
        for d in self.dims:
            if d >= queries.shape[-1]:
                continue
            out = self.base(F.normalize(queries[:, :d], dim=-1), F.normalize(docs[:, :d], dim=-1), group, offset,
                            pos_keys, doc_keys)
            total, n = total + out.loss, n + 1
        return LossOutput(loss=total / n, accuracy=full.accuracy, logits=full.logits)
