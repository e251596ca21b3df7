"""The unit of contrastive training data, shared by every task type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Example:
    """One training example: a query, its positive document and its hard negatives.

    Texts are raw: the instruction is *not* baked into ``query``; the model input builder adds it (and knows which
    tokens to leave out of pooling).
    """

    query: str
    """Query text without instruction."""
    positive: str
    """The positive document text."""
    negatives: List[str] = field(default_factory=list)
    """Hard-negative document texts (the batcher supplies exactly the stage's ``num_hard_negatives``)."""
    instruction: Optional[str] = None
    """One-sentence task definition put before the query (``Instruct: {instruction}\\nQuery: {query}``)."""
    symmetric: bool = False
    """Symmetric task (STS): the instruction is put before the documents too."""
    dataset: str = ""
    """Name of the data spec the example came from (for logs and homogeneous batching)."""
    teacher_scores: Optional[List[float]] = None
    """Optional teacher scores for [positive, *negatives] (score distillation)."""
