"""Start-up checks, run before any model loads: every stage's data specs and sources, the eval suites, the run folder.

A launch calls :func:`load_stages`: the first problem raises (one line, exit 2), before the run folder is marked, and
the data it loaded is what the stages then train on. ``dry_run=true`` (or ``scripts/check_recipe.py``) calls
:func:`dry_run`: the same checks on every dataset, one table row each, no model loaded and nothing written to the run
folder. Hugging Face hub ids are not downloaded by a dry run: their row says ``not checked offline (hf id ...)``.
Reading is cheap after the first time: each source is parsed and checked once into the data cache
(``nvembed/data/cache.py``), which later starts, every rank and the dry run map; a stage's data held until its turn
is index arrays over memory-mapped files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Dict, List, Optional

from .config import ConfigError, RunConfig
from .errors import UserError

if TYPE_CHECKING:  # nvembed.data pulls in datasets: imported where used
    from .data import StageData


class DryRunError(UserError):
    """A dry run found problems; the table above the message has one row per dataset."""

    kind = "dry run"


def check_eval(cfg: RunConfig) -> None:
    """Every evaluation suite exists and parses, every reference model folder exists (only when evaluation is on):
    the reference rows are measured after training, too late to find a typo."""
    if not cfg.eval.enabled:
        return
    from .eval.suite import load_suite
    from .training.evaluation import resolve_baseline, suite_paths

    try:
        for path in suite_paths(cfg):
            load_suite(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"'eval.suites': {e}") from None
    for spec in cfg.eval.baselines:
        target = spec.partition("=")[2] if "=" in spec else spec
        try:
            folder = "bm25" if target.lower() == "bm25" else resolve_baseline(target)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        if folder != "bm25" and not os.path.isdir(folder):
            raise ConfigError(f"'eval.baselines': {spec!r} is neither bm25 nor a model folder ({folder} not found)")


def check_init_from(cfg: RunConfig) -> None:
    """``init_from`` is a folder of an earlier run (a dry run would otherwise not notice a typo there)."""
    if cfg.init_from and not os.path.isdir(cfg.init_from):
        raise ConfigError(f"'init_from': {cfg.init_from} is not a folder (a 'final' or checkpoint folder of a run)")


def load_stage(cfg: RunConfig, name: str, specs_root: str, *, process_index: int = 0, num_processes: int = 1,
               log: Callable[[str], None] = print) -> "StageData":
    """Read and check one stage's data: every spec, every row, and that no batch would repeat an example."""
    from .data import build_stage_data

    st = cfg.stage_defs[name]
    data = build_stage_data(list(st.datasets), stage=name, num_hard_negatives=st.num_hard_negatives,
                            batch_size=st.batch_size, batching=st.batching, seed=cfg.seed,
                            process_index=process_index, num_processes=num_processes, specs_root=specs_root, log=log)
    data.check_fits()
    return data


def load_stages(cfg: RunConfig, specs_root: str, *, process_index: int = 0, num_processes: int = 1,
                log: Callable[[str], None] = print, skip: Collection[str] = ()) -> Dict[str, "StageData"]:
    """Every stage's data (except ``skip``), the eval suites and the exclusions, checked; the first problem raises."""
    from .data import resolve_spec_path

    for x in cfg.excluded_datasets:
        resolve_spec_path(x.spec, specs_root)  # a typo in an exclusion would otherwise go unnoticed
    check_eval(cfg)
    check_init_from(cfg)
    return {name: load_stage(cfg, name, specs_root, process_index=process_index, num_processes=num_processes,
                             log=log)
            for name in cfg.stages if name not in skip}


@dataclass
class Row:
    """One line of the dry-run table."""

    stage: str
    dataset: str
    task: str
    rows: Optional[int]
    examples: Optional[int]
    status: str
    spec: str
    failed: bool = False
    cache_built: Optional[bool] = None
    """True: this check parsed the source into the data cache; False: it mapped an existing entry."""


def _check_stage(cfg: RunConfig, name: str, specs_root: str, num_processes: int) -> List[Row]:
    from .data import SpecError, TaskData
    from .data.batching import check_fits, load_stage_spec

    st = cfg.stage_defs[name]
    rows, specs = [], []
    for sp in st.datasets:
        try:
            specs.append((sp, load_stage_spec(sp, name, specs_root)))
        except SpecError as e:
            rows.append(Row(name, "?", "?", None, None, f"ERROR {e}", sp, failed=True))
    total_weight = sum(spec.weight for _, spec in specs)  # the blended share counts unchecked hf specs too
    seen = set()
    for sp, spec in specs:
        row = Row(name, spec.name, spec.task, None, None, "ok", sp)
        rows.append(row)
        local_hf = spec.source.hf and spec.resolve(spec.source.hf).exists()
        if spec.name in seen:
            row.status, row.failed = f"ERROR {spec.path}: dataset name {spec.name!r} is used by two specs", True
        elif spec.source.hf and not local_hf:
            row.status = f"not checked offline (hf id {spec.source.hf})"
        else:
            try:
                task = TaskData(spec, log=lambda msg: None)
                row.rows, row.examples = task.stats["rows_read"], task.stats["examples"]
                row.cache_built = task.source.entry.built
                if task.stats["rows_skipped"]:
                    row.status = f"ok, {task.stats['rows_skipped']} bad rows skipped (on_error: skip)"
                check_fits(task, spec.weight / total_weight, stage=name, batch_size=st.batch_size,
                           num_processes=num_processes, batching=st.batching)
            except SpecError as e:
                row.status, row.failed = f"ERROR {e}", True
        seen.add(spec.name)
    return rows


def _table(rows: List[Row]) -> str:
    head = ["stage", "dataset", "task", "rows", "examples", "spec", "status"]
    cells = [[r.stage, r.dataset, r.task, "-" if r.rows is None else str(r.rows),
              "-" if r.examples is None else str(r.examples), r.spec, r.status] for r in rows]
    width = [max(len(c[i]) for c in [head] + cells) for i in range(6)]  # the status, last, can be long
    return "\n".join("  ".join([c[i].ljust(width[i]) for i in range(6)] + c[6:]) for c in [head] + cells)


def dry_run(cfg: RunConfig, specs_root: str, out: Callable[[str], None] = print) -> List[Row]:
    """Check everything a launch checks before its model loads, on every dataset, and print one row each.

    Raises :class:`DryRunError` (after printing the table) when anything failed."""
    from .data import SpecError, load_spec, resolve_spec_path
    from .training.checkpoint import RunDirError, guard_output_dir

    num_processes = int(os.environ.get("WORLD_SIZE", "1"))  # a dry run is one process; a launcher sets this
    rows: List[Row] = []
    for name in cfg.stages:
        rows.extend(_check_stage(cfg, name, specs_root, num_processes))
    for x in cfg.excluded_datasets:
        try:
            spec = load_spec(resolve_spec_path(x.spec, specs_root))
            rows.append(Row("-", spec.name, spec.task, None, None, f"excluded: {x.reason}", x.spec))
        except SpecError as e:
            rows.append(Row("-", "?", "-", None, None, f"ERROR excluded_datasets: {e}", x.spec, failed=True))
    problems = [r.status[len("ERROR "):] for r in rows if r.failed]  # each message names its spec file
    out(_table(rows))
    for check in (lambda: check_eval(cfg), lambda: check_init_from(cfg),
                  lambda: guard_output_dir(cfg.output_dir, cfg.resume)):
        try:
            check()
        except (ConfigError, RunDirError) as e:
            problems.append(str(e))
            out(f"ERROR {e}")
    m = cfg.model
    model = (f"random init ({m.random_init.get('model_type')})" if m.random_init
             else " / ".join(x for x in (m.name_or_path, m.gguf_file) if x) + " (not loaded by a dry run)")
    counts = {"ok": sum(r.status.startswith("ok") for r in rows),
              "not checked offline": sum(r.status.startswith("not checked") for r in rows),
              "excluded": sum(r.status.startswith("excluded") for r in rows), "failed": len(problems)}
    from .data.cache import cache_dir

    built = [r.cache_built for r in rows if r.cache_built is not None]
    # the parsed sources stay in the data cache: the launch that follows maps them instead of parsing again
    out(f"dry run: model {model}; {len(rows)} dataset rows: "
        + ", ".join(f"{v} {k}" for k, v in counts.items()) + "; nothing written to the run folder; data cache "
        f"{cache_dir()}: {sum(built)} built, {len(built) - sum(built)} reused")
    if problems:
        raise DryRunError(f"{len(problems)} problem(s) (table above); first: {problems[0]}")
    return rows
