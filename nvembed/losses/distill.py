"""Score distillation: KL(teacher || student) over each query's own candidates [positive, *negatives].

The student distribution is softmax(cos / tau) over the query's group; the teacher's is softmax(score / T) of
scores a teacher (cross-encoder, LLM, bigger embedder) gave the same candidates, carried in the data
(``Example.teacher_scores``). Used as ``loss = infonce + weight * kl``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(queries: torch.Tensor, own_docs: torch.Tensor, teacher_scores: torch.Tensor,
               temperature: float = 0.02, teacher_temperature: float = 1.0) -> torch.Tensor:
    """queries [B, d]; own_docs [B, G, d]; teacher_scores [B, G] -> scalar KL (batch mean)."""
    student = torch.einsum("bd,bgd->bg", queries, own_docs) / temperature
    target = F.softmax(teacher_scores.float() / teacher_temperature, dim=-1)
    return F.kl_div(F.log_softmax(student.float(), dim=-1), target, reduction="batchmean")
