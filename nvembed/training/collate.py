"""A list of Examples -> tokenized query / document batches, text keys for false-negative masking."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..data.example import Example
from ..hf.inputs_nvembed import build_prompt, tokenize


def text_key(text: str) -> int:
    """Stable 63-bit hash of a text, equal on every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass
class Batch:
    queries: Dict[str, torch.Tensor]
    docs: Dict[str, torch.Tensor]
    """Documents grouped per query: positive then ``group - 1`` hard negatives."""
    group: int
    pos_keys: torch.Tensor
    doc_keys: torch.Tensor
    teacher_scores: Optional[torch.Tensor]
    """[B, group] teacher scores; a NaN row marks an example without them (left out of distillation). None when
    no example of the batch has scores."""

    def to(self, device) -> "Batch":
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Batch(mv(self.queries), mv(self.docs), self.group, self.pos_keys.to(device), self.doc_keys.to(device),
                     None if self.teacher_scores is None else self.teacher_scores.to(device))

    @property
    def num_tokens(self) -> int:
        return int(self.queries["attention_mask"].sum() + self.docs["attention_mask"].sum())

    @property
    def num_sequences(self) -> int:
        return int(self.queries["input_ids"].shape[0] + self.docs["input_ids"].shape[0])


class Collator:
    def __init__(self, tokenizer, template: str, query_max_length: int, doc_max_length: int, num_hard_negatives: int,
                 add_eos: bool = True, exclude_instruction: bool = True):
        self.tokenizer = tokenizer
        self.template = template
        self.q_len, self.d_len = query_max_length, doc_max_length
        self.k = num_hard_negatives
        self.add_eos = add_eos
        self.exclude = exclude_instruction

    def __call__(self, examples: List[Example]) -> Batch:
        q_texts, q_prompts, d_texts, d_prompts, teacher = [], [], [], [], []
        for ex in examples:
            if len(ex.negatives) < self.k:
                raise ValueError(f"example from '{ex.dataset}' has {len(ex.negatives)} hard negatives, "
                                 f"the stage asks for {self.k}")
            prompt = build_prompt(ex.instruction, self.template)
            q_texts.append(ex.query)
            q_prompts.append(prompt)
            docs = [ex.positive] + list(ex.negatives[: self.k])
            d_texts.extend(docs)
            d_prompts.extend([prompt if ex.symmetric else ""] * len(docs))
            ts = ex.teacher_scores
            # too few scores for the group cannot be aligned with its documents: treat as unscored
            teacher.append([float(x) for x in ts[: 1 + self.k]] if ts is not None and len(ts) >= 1 + self.k
                           else [float("nan")] * (1 + self.k))
        tok = lambda t, p, n: tokenize(self.tokenizer, t, p, max_length=n, add_eos=self.add_eos,  # noqa: E731
                                       exclude_prompt=self.exclude)
        # keys include the prompt: the same text under another task is a different document
        pos_keys = [text_key((p if e.symmetric else "") + e.positive) for p, e in zip(q_prompts, examples)]
        doc_keys = [text_key(p + t) for p, t in zip(d_prompts, d_texts)]
        # per-example rows, not all-or-nothing: a blended batch or one filled negative must not drop the
        # distillation signal of the other examples
        teacher_t = torch.tensor(teacher, dtype=torch.float32).reshape(len(examples), 1 + self.k)
        return Batch(
            queries=tok(q_texts, q_prompts, self.q_len),
            docs=tok(d_texts, d_prompts, self.d_len),
            group=1 + self.k,
            pos_keys=torch.tensor(pos_keys, dtype=torch.long),
            doc_keys=torch.tensor(doc_keys, dtype=torch.long),
            teacher_scores=teacher_t if bool(torch.isfinite(teacher_t).all(dim=1).any()) else None,
        )
