"""Losses, one per file: InfoNCE (in-batch / hard negatives), Matryoshka wrapper, score distillation."""

from .distill import distill_kl
from .infonce import InfoNCELoss, LossOutput
from .matryoshka import MatryoshkaLoss

__all__ = ["InfoNCELoss", "LossOutput", "MatryoshkaLoss", "distill_kl"]
