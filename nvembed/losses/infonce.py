"""InfoNCE over cosine similarity with hard negatives and optional in-batch negatives.

Inputs
    queries  [B, d]   L2-normalised query embeddings (this process).
    docs     [N, d]   L2-normalised documents, grouped per query: ``group`` = 1 + k texts each (positive first).
                      With cross-device negatives, ``docs`` holds every process's groups and ``offset`` says where
                      this process's first group starts.
Loss
    -log softmax(cos(q_i, D) / tau)[pos_i], averaged over queries. In-batch on: D = all docs (other queries'
    positives and hard negatives too). In-batch off: D = the query's own group (NV-Embed stage 2).
False negatives
    With ``pos_keys`` / ``doc_keys`` (hashes of texts), an in-batch candidate whose text equals the query's own
    positive is masked out instead of being pushed away.
References: E5-mistral (arXiv 2401.00368, Eq. 2-3, tau 0.02); NV-Embed (arXiv 2405.17428, section 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor
    """Share of queries whose positive scores highest among their candidates."""
    logits: torch.Tensor


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.02, in_batch_negatives: bool = True, mask_false_negatives: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError("loss.temperature must be > 0")
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.mask_false_negatives = mask_false_negatives

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, group: int, offset: int = 0,
                pos_keys: Optional[torch.Tensor] = None, doc_keys: Optional[torch.Tensor] = None) -> LossOutput:
        b = queries.shape[0]
        rows = torch.arange(b, device=queries.device)
        if not self.in_batch_negatives:
            own = docs[offset:offset + b * group].view(b, group, -1)
            logits = torch.einsum("bd,bgd->bg", queries, own) / self.temperature
            target = torch.zeros(b, dtype=torch.long, device=queries.device)
        else:
            logits = queries @ docs.T / self.temperature
            target = offset + rows * group
            if self.mask_false_negatives and pos_keys is not None and doc_keys is not None:
                same = doc_keys.unsqueeze(0) == pos_keys.unsqueeze(1)  # [B, N]
                same[rows, target] = False
                logits = logits.masked_fill(same, float("-inf"))
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)
        acc = (logits.argmax(dim=1) == target).float().mean()
        return LossOutput(loss=loss, accuracy=acc.detach(), logits=logits)
