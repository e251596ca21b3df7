"""Hydra sweeps: ``train/train.py -m --config-name=smoke output_dir=DIR model.pooling.mode=latent_attention,mean``.

Hydra's own multirun expands the comma lists (several keys: every combination) and launches one run per combination.
Each run gets its own folder named from the swept overrides only, ``DIR/model.pooling.mode=mean/`` (several keys:
``DIR/model.pooling.mode=mean,seed=1/``; keys given one value stay out of the name). After every run, the sweep's
table is rewritten: ``DIR/sweep.json`` and ``DIR/sweep.md``, one row per run with its overrides, status, final loss
and, when the recipe evaluates, the main scores of its last evaluation.

A sweep whose run folders already hold runs is refused before anything is written (Hydra's ``multirun.yaml``
included); ``resume=true`` continues those runs and starts the ones not there yet (a killed sweep, or one extended
with more values). Rows of earlier sweeps into the same DIR stay in the table.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from . import errors

SWEEP_FLAGS = ("-m", "--multirun")
NAME_RESOLVER = "nvembed_run_name"
NEVER_IN_NAME = ["output_dir", "resume"]  # where the sweep goes and whether it continues: not what a run varies


def run_name(override_dirname: str) -> str:
    """Hydra's ``override_dirname`` without the ``++`` that train_main puts before every key, and no ``/`` (which
    would nest folders)."""
    name = re.sub(r"(^|,)(\+\+|\+|~)", r"\1", str(override_dirname)).replace("/", "_")
    return name or "run"


OmegaConf.register_new_resolver(NAME_RESOLVER, run_name, replace=True)


def is_sweep(options: List[str]) -> bool:
    return any(o in SWEEP_FLAGS for o in options)


def hydra_args(overrides: List[str]) -> List[str]:
    """Hydra settings of a sweep: runs under ``output_dir`` named from the swept keys, the table callback.
    ``overrides`` are the user's ``key=value`` arguments (a swept one holds a comma list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    keys = [o.key_or_group for o in parsed]
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    fixed = [k for k in keys if k not in swept] if swept else []  # nothing swept: name from every override
    exclude = sorted(set(NEVER_IN_NAME + fixed))
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    mine = {  # the subdir is quoted: the override grammar refuses a nested ${} unquoted
        "hydra.sweep.dir": "${output_dir}",
        "hydra.sweep.subdir": "'${%s:${hydra.job.override_dirname}}'" % NAME_RESOLVER,
        "hydra.job.config.override_dirname.exclude_keys": "[" + ",".join(exclude) + "]",
        "++hydra.callbacks.nvembed_sweep._target_": "nvembed.sweep.SweepCallback",
    }
    return [f"{k}={v}" for k, v in mine.items() if k.lstrip("+") not in given]


def for_job(raw: DictConfig) -> DictConfig:
    """Inside a sweep: the run goes to its Hydra job folder; with ``resume=true`` a run not started yet starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return raw
    out = HydraConfig.get().runtime.output_dir
    with open_dict(raw):
        raw.output_dir = out
        if raw.get("resume") and not holds_run(out):
            raw.resume = False
    return raw


def holds_run(folder: str) -> bool:
    """The test the trainer applies before a fresh start (``checkpoint.guard_output_dir``)."""
    from .training.checkpoint import RunDirError, guard_output_dir

    try:
        guard_output_dir(folder, resume=False)
        return False
    except RunDirError:
        return True


def expand(config: DictConfig) -> List[Tuple[str, Dict[str, str]]]:
    """(folder name, swept overrides) of every run of the sweep, as Hydra's basic sweeper will launch them."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    task = params + list(config.hydra.overrides.task)
    od = config.hydra.job.config.override_dirname
    exclude = list(od.exclude_keys)
    jobs = []
    for job in BasicSweeper.split_arguments(parser.parse_overrides(task), None)[0]:
        parsed = parser.parse_overrides(job)
        name = run_name(get_overrides_dirname(parsed, exclude_keys=exclude, item_sep=od.item_sep, kv_sep=od.kv_sep))
        jobs.append((name, {o.key_or_group: o.get_value_element_as_str() for o in parsed
                            if o.key_or_group not in exclude}))
    return jobs


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class SweepCallback(Callback):
    """Checks the sweep's run folders before it starts, and writes the table after every run."""

    def __init__(self) -> None:
        self.dir = ""
        self.jobs: List[Tuple[str, Dict[str, str]]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.dir = str(config.hydra.sweep.dir)
        self.jobs = expand(config)
        try:
            check_folders(self.dir, self.jobs, bool(config.get("resume", False)))
        except errors.UserError as e:  # Hydra would print a traceback and exit 1: ours is one line and exit 2
            errors.report(e)
            raise SystemExit(errors.EXIT_USER_ERROR) from None
        if _main_process():
            print(f"[nvembed] sweep: {len(self.jobs)} runs under {self.dir}", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _main_process():
            print(f"[nvembed] sweep run {config.hydra.job.num + 1}/{len(self.jobs) or '?'}: "
                  f"{config.hydra.runtime.output_dir}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.jobs and _main_process():
            write_table(self.dir, self.jobs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.jobs and _main_process():
            md = write_table(self.dir, self.jobs)
            print("\n" + open(md).read(), flush=True)


def check_folders(sweep_dir: str, jobs: List[Tuple[str, Dict[str, str]]], resume: bool) -> None:
    from .rundir import RUN_MARKER, RunDirError

    if os.path.isfile(os.path.join(sweep_dir, RUN_MARKER)):
        raise RunDirError(f"output_dir {sweep_dir} holds a single run; a sweep (-m) puts one run per combination "
                          f"in sub-folders of a folder of its own: choose a new output_dir. Nothing was changed.")
    taken = [name for name, _ in jobs if holds_run(os.path.join(sweep_dir, name))]
    if taken and not resume:
        raise RunDirError(f"output_dir {sweep_dir} already holds {len(taken)} of this sweep's {len(jobs)} runs "
                          f"({', '.join(taken)}); pass resume=true to continue the sweep (runs not there yet are "
                          f"started), or choose a new output_dir. Nothing was changed.")


# ---- the table ----------------------------------------------------------------------------------------------------
def run_row(sweep_dir: str, name: str, overrides: Dict[str, str]) -> Dict[str, Any]:
    """One run's row: overrides, status, final training loss, main scores of its last evaluation."""
    from .rundir import STATE, RunDir
    from .training.tracking import read_metrics

    out = os.path.join(sweep_dir, name)
    run = RunDir(out)
    row: Dict[str, Any] = {"run": name, "output_dir": out, "overrides": overrides, "status": "not started",
                           "final_loss": None, "eval_label": None, "eval": {}, "eval_avg": None}
    if not run.is_run():
        return row
    with open(run.marker) as f:
        stages = json.load(f).get("stages", [])
    done = all(os.path.isfile(os.path.join(run.stage_final(s), STATE)) for s in stages)
    row["status"] = "complete" if done else "incomplete"
    try:
        steps = [r for r in read_metrics(out) if r.get("event") == "step" and r.get("loss") is not None]
    except errors.UserError as e:  # a damaged metrics.jsonl: the row says so, the other rows are still written
        row["status"] += f" (metrics unreadable: {e})"
        steps = []
    if steps:
        row["final_loss"] = steps[-1]["loss"]
    results = run.eval_file("results")
    if os.path.isfile(results):
        with open(results) as f:
            evals = json.load(f)
        labels = [lab for lab in ["untrained"] + [f"after_{s}" for s in stages] if lab in evals]
        if labels:
            last = evals[labels[-1]]
            row["eval_label"] = labels[-1]
            row["eval"] = {t: r.get("main_score") for t, r in last.get("tasks", {}).items()}
            row["eval_avg"] = last.get("average", {}).get("all")
    return row


def write_table(sweep_dir: str, jobs: List[Tuple[str, Dict[str, str]]]) -> str:
    """Rewrite ``sweep.json`` and ``sweep.md``: this sweep's runs, after the rows of earlier sweeps into the same
    folder whose runs are still there. Returns the path of ``sweep.md``."""
    path = os.path.join(sweep_dir, "sweep.json")
    rows: Dict[str, Dict[str, Any]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for r in json.load(f).get("runs", []):
                if os.path.isdir(os.path.join(sweep_dir, r["run"])):
                    rows[r["run"]] = run_row(sweep_dir, r["run"], r["overrides"])
    for name, overrides in jobs:
        rows[name] = run_row(sweep_dir, name, overrides)
    os.makedirs(sweep_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"sweep_dir": sweep_dir, "runs": list(rows.values())}, f, indent=2)
    os.replace(tmp, path)
    md = os.path.join(sweep_dir, "sweep.md")
    with open(f"{md}.tmp{os.getpid()}", "w") as f:
        f.write(format_table(list(rows.values())) + "\n")
    os.replace(f"{md}.tmp{os.getpid()}", md)
    return md


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown: one column per override key, then status, final loss, eval main scores (x100) and their mean."""
    keys: List[str] = []
    tasks: List[str] = []
    for r in rows:
        keys += [k for k in r["overrides"] if k not in keys]
        tasks += [t for t in r["eval"] if t not in tasks]

    def num(v: Any, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v * scale:.4f}" if scale == 1.0 else f"{v * scale:.2f}"

    head = keys + ["status", "final loss"] + tasks + (["eval avg"] if tasks else [])
    align = ["---"] * (len(keys) + 1) + ["---:"] * (len(head) - len(keys) - 1)  # numbers right-aligned
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [r["overrides"].get(k, "-") for k in keys] + [r["status"], num(r["final_loss"])]
        cells += [num(r["eval"].get(t), 100.0) for t in tasks] + ([num(r["eval_avg"], 100.0)] if tasks else [])
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
