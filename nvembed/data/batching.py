"""Weighted, sharded, resumable batches over several specs.

Each rank builds its own StageData over the same memory-mapped data cache (``nvembed/data/cache.py``): what it holds
is numpy index arrays, and ``batch(step)`` fetches only the rows of its own slots.

``batch(step)`` is a pure function of (seed, step): the dataset of every slot in an epoch comes from a per-epoch
schedule (counts per step, apportioned by weight), and each dataset is read through its own stream of permutations.
The position of a slot in its dataset's stream is the number of earlier slots of that dataset in the epoch, so any
step can be rebuilt without replaying the ones before it (resume = call ``batch(step)``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from .. import paths
from .example import Example
from .spec import DataSpec, SpecError, load_spec
from .tasks import TaskData

BATCHING = ("homogeneous", "blended")


def _apportion(total: int, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts summing to ``total`` with expectation ``total * p`` and the least variance."""
    exact = total * p
    counts = np.floor(exact).astype(np.int64)
    rest = int(total - counts.sum())
    if rest:
        frac = exact - counts
        counts[rng.choice(len(p), rest, replace=False, p=frac / frac.sum())] += 1
    return counts


class StageData:
    def __init__(self, tasks: List[TaskData], *, stage: str, num_hard_negatives: int, batch_size: int,
                 batching: str, seed: int, process_index: int, num_processes: int):
        if batching not in BATCHING:
            raise SpecError(f"batching is {batching!r}; valid choices: {', '.join(BATCHING)}")
        if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"bad sharding: batch_size={batch_size} process {process_index} of {num_processes}")
        self.tasks, self.stage, self.batching, self.seed = tasks, stage, batching, seed
        self.num_hard_negatives, self.batch_size = num_hard_negatives, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.global_batch = batch_size * num_processes
        w = np.asarray([t.spec.weight for t in tasks], dtype=np.float64)
        self.p = w / w.sum()
        self.sizes = [len(t.units) for t in tasks]
        # weights change the mixture, not the epoch length: one epoch ~ one pass over all units
        self.steps_per_epoch = max(1, sum(self.sizes) // self.global_batch)
        self._sched: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._perms: "OrderedDict[tuple, np.ndarray]" = OrderedDict()

    def check_fits(self) -> None:
        """Refuse a dataset smaller than what one batch takes from it (training calls this; tools that only read
        a few batches of a tiny file need not)."""
        for t, share in zip(self.tasks, self.p):
            check_fits(t, float(share), stage=self.stage, batch_size=self.batch_size,
                       num_processes=self.num_processes, batching=self.batching)

    @property
    def names(self) -> List[str]:
        return [t.spec.name for t in self.tasks]

    @property
    def stats(self) -> Dict[str, Dict[str, Any]]:
        return {t.spec.name: {k: dict(v) if isinstance(v, dict) else v for k, v in t.stats.items()}
                for t in self.tasks}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, *key])

    def _schedule(self, epoch: int) -> np.ndarray:
        """(steps+1, datasets) cumulative slot counts: row s = slots of each dataset before step s."""
        if epoch not in self._sched:
            S, D, G = self.steps_per_epoch, len(self.tasks), self.global_batch
            rng = self._rng(1, epoch)
            counts = np.zeros((S, D), dtype=np.int64)
            if self.batching == "homogeneous":
                per = _apportion(S, self.p, rng)
                order = rng.permutation(np.repeat(np.arange(D), per))
                counts[np.arange(S), order] = G
            else:
                for s in range(S):
                    counts[s] = _apportion(G, self.p, rng)
            cum = np.zeros((S + 1, D), dtype=np.int64)
            np.cumsum(counts, axis=0, out=cum[1:])
            self._sched[epoch] = cum
            while len(self._sched) > 2:
                self._sched.popitem(last=False)
        return self._sched[epoch]

    def _unit(self, d: int, epoch: int, pos: int) -> int:
        n = self.sizes[d]
        cycle, i = divmod(pos, n)
        key = (d, epoch, cycle)
        if key not in self._perms:
            self._perms[key] = self._rng(2, epoch, d, cycle).permutation(n)
            while len(self._perms) > 2 * len(self.tasks) + 2:
                self._perms.popitem(last=False)
        return int(self.tasks[d].units[self._perms[key][i]])

    def dataset_plan(self, step: int) -> List[int]:
        """Dataset index of every slot of the global batch at ``step`` (after the in-step shuffle)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        cum = self._schedule(epoch)
        slots = np.repeat(np.arange(len(self.tasks)), cum[s + 1] - cum[s])
        return self._rng(3, epoch, s).permutation(slots).tolist()

    def batch(self, step: int) -> List[Example]:
        """This process's ``batch_size`` examples of global step ``step``."""
        if step < 0:
            raise ValueError("step must be >= 0")
        epoch, s = divmod(step, self.steps_per_epoch)
        cum = self._schedule(epoch)
        plan = self.dataset_plan(step)
        seen = [0] * len(self.tasks)
        lo, hi = self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size
        mine: Dict[int, List[tuple]] = {}
        for slot, d in enumerate(plan):
            pos = int(cum[s, d]) + seen[d]
            seen[d] += 1
            if lo <= slot < hi:
                mine.setdefault(d, []).append((slot, self._unit(d, epoch, pos)))
        out: Dict[int, Example] = {}
        for d, items in mine.items():
            rngs = [self._rng(4, epoch, s, slot) for slot, _ in items]
            for (slot, _), ex in zip(items, self.tasks[d].make([u for _, u in items], rngs,
                                                               self.num_hard_negatives)):
                out[slot] = ex
        return [out[k] for k in sorted(out)]

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def slots_per_batch(share: float, global_batch: int, batching: str) -> int:
    """Most examples one global batch takes from a dataset with this share of the stage's weight."""
    return global_batch if batching == "homogeneous" else int(math.ceil(global_batch * share - 1e-9))


def check_fits(task: TaskData, share: float, *, stage: str, batch_size: int, num_processes: int,
               batching: str) -> None:
    """A dataset smaller than what one batch takes from it would repeat examples inside the batch (a repeated
    example is its own in-batch negative): refuse, naming the spec, its size and the key to change."""
    need = slots_per_batch(share, batch_size * num_processes, batching)
    have = len(task.units)
    if have >= need:
        return
    fits = have // num_processes if batching == "homogeneous" else int(have / (num_processes * share) + 1e-9)
    what = f"{have} examples from {task.stats['rows_read']} rows"
    procs = f" x {num_processes} processes" if num_processes > 1 else ""
    fix = (f"lower 'stage_defs.{stage}.batch_size' to {fits} or less, or give the spec more rows" if fits >= 1
           else "give the spec more rows")
    raise SpecError(f"{task.spec.path}: {what}, but one {batching} batch of stage {stage!r} takes {need} "
                    f"(batch_size {batch_size}{procs}): examples would repeat within a batch; {fix}")


def load_stage_spec(path: str | Path, stage: str, specs_root: str | Path = "data_specs") -> DataSpec:
    """Find, read and validate one spec of a stage (no data is read)."""
    spec = load_spec(resolve_spec_path(path, specs_root))
    if spec.stages and stage not in spec.stages:
        raise SpecError(f"{spec.path}: used in stage {stage!r}, but its 'stages' are {spec.stages}")
    return spec


def resolve_spec_path(path: str | Path, specs_root: str | Path = "data_specs") -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    candidates = [Path(specs_root) / p]
    if not Path(specs_root).is_absolute():  # also work when launched from outside the repository
        candidates.append(Path(paths.bundle_root()) / specs_root / p)
    candidates.append(Path.cwd() / p)  # a user's own spec beside their data, e.g. runs/own/mined.yaml
    for c in candidates:
        if c.exists():
            return c
    raise SpecError(f"spec {str(path)!r} not found (looked in: {', '.join(str(c) for c in candidates)})")


def build_stage_data(spec_paths: Sequence[str | Path], *, stage: str = "stage1", num_hard_negatives: int = 1,
                     batch_size: int = 8, batching: str = "homogeneous", seed: int = 42, process_index: int = 0,
                     num_processes: int = 1, specs_root: str | Path = "data_specs",
                     log: Callable[[str], None] = print) -> StageData:
    """Load every spec of a stage, read and convert its rows, and return the batch source."""
    if not spec_paths:
        raise SpecError(f"stage {stage!r} lists no datasets")
    tasks: List[TaskData] = []
    for sp in spec_paths:
        spec = load_stage_spec(sp, stage, specs_root)
        if any(t.spec.name == spec.name for t in tasks):
            raise SpecError(f"{spec.path}: dataset name {spec.name!r} is used by two specs of stage {stage!r}")
        t = TaskData(spec, log)
        log(f"[data] {stage} {spec.name} ({spec.task}, weight {spec.weight:g}): {t.summary()}; "
            f"{t.source.cache_note}")
        tasks.append(t)
    data = StageData(tasks, stage=stage, num_hard_negatives=num_hard_negatives, batch_size=batch_size,
                     batching=batching, seed=seed, process_index=process_index, num_processes=num_processes)
    log(f"[data] {stage}: {sum(data.sizes)} examples, {data.steps_per_epoch} steps/epoch "
        f"of {data.global_batch} ({batching})")
    return data
