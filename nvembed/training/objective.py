"""The contrastive objective of one stage: embeddings -> InfoNCE (matryoshka-wrapped if asked) with cross-device
negatives, plus the distillation KL and its counts.

Used as is by the trainer, by GradCache (on cached embeddings) and by ``scripts/benchmark.py``::

    objective = ContrastiveObjective(cfg.loss, stage_cfg, process_index=acc.process_index,
                                     num_processes=acc.num_processes)
    out = objective(model, batch)          # LossOutput(loss, accuracy, logits)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from ..config import LossConfig, StageConfig
from ..losses import InfoNCELoss, LossOutput, MatryoshkaLoss, distill_kl
from .collate import Batch
from .distributed import all_gather_no_grad, all_gather_with_grad


@dataclass
class DistillCounts:
    """Distillation bookkeeping of this process over a stage."""

    batches: int = 0
    """Micro-batches with a KL term."""
    skipped_batches: int = 0
    """Micro-batches without one (no example carried teacher scores)."""
    examples: int = 0
    """Examples that entered the KL term."""
    unscored_examples: int = 0
    """Examples left out of it (no or non-finite teacher scores)."""

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


class ContrastiveObjective:
    """The loss of one stage. ``process_index`` / ``num_processes``: this process's place among the data-parallel
    ones (cross-device negatives gather every process's documents when there are several)."""

    def __init__(self, loss: LossConfig, stage: StageConfig, *, process_index: int = 0, num_processes: int = 1):
        self.cfg, self.stage = loss, stage
        self.process_index, self.num_processes = process_index, num_processes
        fn = InfoNCELoss(loss.temperature, stage.in_batch_negatives, loss.mask_false_negatives)
        self.loss_fn = MatryoshkaLoss(fn, loss.matryoshka_dims) if loss.matryoshka_dims else fn
        self.counts = DistillCounts()

    @property
    def distills(self) -> bool:
        return self.cfg.distill_weight > 0

    @staticmethod
    def embed(model, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return model(**batch.queries), model(**batch.docs)

    def __call__(self, model, batch: Batch) -> LossOutput:
        """Embed the batch with ``model`` and return its loss."""
        q, d = self.embed(model, batch)
        return self.loss(q, d, batch)

    def loss(self, q: torch.Tensor, d: torch.Tensor, batch: Batch) -> LossOutput:
        """Loss from embeddings (GradCache passes cached ones): gathers documents across processes if the stage
        uses in-batch negatives and ``loss.cross_device_negatives`` is on."""
        offset, docs, doc_keys = 0, d, batch.doc_keys
        if self.stage.in_batch_negatives and self.cfg.cross_device_negatives and self.num_processes > 1:
            docs = all_gather_with_grad(d)
            doc_keys = all_gather_no_grad(batch.doc_keys)
            offset = self.process_index * d.shape[0]
        out = self.loss_fn(q, docs, batch.group, offset, batch.pos_keys, doc_keys)
        if self.distills:
            kl = self.distill(q, d, batch)
            if kl is not None:
                out = LossOutput(loss=out.loss + self.cfg.distill_weight * kl, accuracy=out.accuracy,
                                 logits=out.logits)
        return out

    def distill(self, q: torch.Tensor, d: torch.Tensor, batch) -> Optional[torch.Tensor]:
        """KL towards the teacher over the examples that carry scores (NaN rows do not); None, counted as a skipped
        micro-batch, when none does. Each process uses its own groups: no gather is needed."""
        c, ts = self.counts, batch.teacher_scores
        rows = torch.isfinite(ts).all(dim=1) if ts is not None else None
        n = int(rows.sum()) if rows is not None else 0
        c.examples += n
        c.unscored_examples += q.shape[0] - n
        if n == 0:
            c.skipped_batches += 1
            return None
        c.batches += 1
        own = d.view(q.shape[0], batch.group, -1)
        return distill_kl(q[rows], own[rows], ts[rows], self.cfg.temperature, self.cfg.distill_temperature)
