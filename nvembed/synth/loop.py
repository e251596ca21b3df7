"""The one resumable, chunked LLM-call loop of every synthesis phase (E5 brainstorm and examples, FRet queries and
reranking).

A phase is a list of work items keyed by ``id`` and a ``work(chunk)`` function that makes the LLM calls for a chunk
and returns one :class:`Outcome` per item. :meth:`SynthRun.phase` skips items already in the phase's last log (the
append-only JSONL of :mod:`.resume`), sends the rest chunk by chunk within the run's call budget (``--limit``),
appends each chunk's records to the logs in order, counts statuses and stops at once when the endpoint went down,
after saving the chunk. An outcome without records (a request that failed for good) marks nothing done: the next run
asks again.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .llm import BaseLLM, check_reachable
from .resume import JsonlLog, progress, stable_id

Item = Dict[str, Any]


@dataclass
class Outcome:
    """What one item gave."""

    status: str
    """Counted as ``<prefix><status>`` in the run's counts (``failed_request``: the LLM gave nothing)."""
    records: Tuple[Optional[Dict[str, Any]], ...] = ()
    """One record per log of the phase (None: nothing for that log); none at all: the item is not done."""
    counts: Dict[str, int] = field(default_factory=dict)
    """Further counters to add (e.g. ``relabeled``)."""


FAILED = Outcome("failed_request")


def chunk_seed(seed: int, first_id: str) -> int:
    """The sampling seed of a chunk: fixed by the run seed and the chunk's first item, not by run order."""
    return int(stable_id(seed, first_id)[:8], 16)


def generate_work(llm: BaseLLM, prompt: Callable[[Item], str], parse: Callable[[Item, str], Outcome], *,
                  max_new_tokens: int, temperature: float, seed: int) -> Callable[[List[Item]], List[Outcome]]:
    """``work`` for a generation phase: one prompt per item, one ``generate`` call per chunk; an empty reply (a request
    that failed for good) is :data:`FAILED`, any other goes to ``parse``."""
    def work(chunk: List[Item]) -> List[Outcome]:
        texts = llm.generate([prompt(it) for it in chunk], max_new_tokens, temperature,
                             seed=chunk_seed(seed, chunk[0]["id"]))
        return [parse(it, text) if text else FAILED for it, text in zip(chunk, texts)]

    return work


class SynthRun:
    """The counts and the LLM-call budget of one run, shared by its phases."""

    def __init__(self, llm: BaseLLM, out_dir: Any, *, limit: Optional[int] = None, show_progress: bool = True):
        self.llm, self.out_dir, self.show_progress = llm, out_dir, show_progress
        self.left = math.inf if limit is None else limit
        """Items this run may still send to the LLM."""
        self.counts: Counter = Counter()

    def phase(self, desc: str, items: Sequence[Item], logs: Sequence[JsonlLog],
              work: Callable[[List[Item]], List[Outcome]], *, chunk_size: int, prefix: str = "") -> int:
        """Run ``work`` over the items not yet in ``logs[-1]``; returns how many were sent."""
        done = logs[-1]
        pending = [it for it in items if it["id"] not in done]
        if not pending or self.left <= 0:
            return 0
        bar = progress(len(items), desc, len(items) - len(pending), disable=not self.show_progress)
        pending = pending[:int(min(len(pending), self.left))]
        try:
            for i in range(0, len(pending), max(1, chunk_size)):
                chunk = pending[i:i + max(1, chunk_size)]
                outcomes = work(chunk)
                per_log: List[List[Dict[str, Any]]] = [[] for _ in logs]
                for o in outcomes:
                    self.left -= 1
                    self.counts[prefix + o.status] += 1
                    for k, v in o.counts.items():
                        self.counts[k] += v
                    for rows, rec in zip(per_log, o.records):
                        if rec is not None:
                            rows.append(rec)
                for log, rows in zip(logs, per_log):  # in order: the last log marks items done
                    log.append(rows)
                check_reachable(self.llm, self.out_dir)  # endpoint down: stop now, what succeeded is saved
                bar.update(len(chunk))
        finally:
            bar.close()
        return len(pending)


def check_run(llm: BaseLLM, stats: Dict[str, Any], out_dir: Any) -> None:
    """Raise :class:`~nvembed.synth.llm.LLMError` (exit 2 in the CLIs) when every request of this run failed."""
    from .llm import LLMError

    this_run = stats.get("this_run", {})
    failed = sum(v for k, v in this_run.items() if k.endswith("failed_request"))
    if failed and failed == sum(this_run.values()):
        where = getattr(llm, "base_url", None) or llm.name
        raise LLMError(f"{where}: all {failed} request(s) of this run failed (last error: {llm.last_error}); "
                       f"nothing was added to {out_dir}")
