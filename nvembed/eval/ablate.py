"""Ablations of the NV-Embed choices: one Hydra sweep per group of settings, every setting over several seeds, each
run's exported model evaluated on a held-out suite, then mean and spread per setting.

Groups (each compared with the reference: the recipe as written, NV-Embed's choices):

* ``pooling_attention``: pooling {latent_attention, mean, last_token} x attention {bidirectional, causal};
* ``stage2_in_batch``: stage 2 with in-batch negatives on (NV-Embed turns them off);
* ``one_stage``: stage 1 only, for as many steps as both stages together (equal compute);
* ``single_stage``: the paper's single-stage training (NV-Embed Table 4): every dataset in one stage (the last stage's
  blend) for as many steps as both stages together, with in-batch negatives on and off;
* ``zero_init_residual``: the latent-attention head's residual branches initialised randomly instead of at zero.

Layout: ``OUT/GROUP/`` is a sweep folder (``sweep.md``; one run folder per setting and seed, named by Hydra from the
swept keys), ``OUT/GROUP/RUN/ablation_eval.json`` the suite result of that run's ``final/`` export, and
``OUT/ablations.{json,md,png}`` the table over every group. Re-running continues: finished runs and evaluations are
kept, missing ones are started.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Callable, Dict, List, Optional, Sequence

from .experiment import (TYPES, ExperimentError, cell, check_extra, check_seeds, evaluate_export, load_recipe,
                         mean_std, read_json, resolve_suite, sweep_command, write_json)

REFERENCE = "reference"
EVAL_FILE = "ablation_eval.json"


def groups(recipe: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    """Group name -> Hydra overrides (a comma list is swept). ``recipe`` is the composed recipe (a plain dict), read
    for the step counts of the equal-compute one-stage run."""
    stages = list(recipe.get("stages") or [])
    defs = recipe.get("stage_defs") or {}
    out: Dict[str, Dict[str, str]] = {
        "pooling_attention": {"model.pooling.mode": "latent_attention,mean,last_token",
                              "model.bidirectional": "true,false"},
    }
    if len(stages) >= 2:
        second = stages[1]
        if defs.get(second, {}).get("in_batch_negatives", True) is False:
            out["stage2_in_batch"] = {f"stage_defs.{second}.in_batch_negatives": "true"}
        total = sum(int(defs.get(s, {}).get("max_steps") or 0) for s in stages)
        if total > 0 and all(int(defs.get(s, {}).get("max_steps") or 0) > 0 for s in stages):
            out["one_stage"] = {"stages": f"[{stages[0]}]", f"stage_defs.{stages[0]}.max_steps": str(total)}
            last = stages[-1]
            out["single_stage"] = {"stages": f"[{last}]", f"stage_defs.{last}.max_steps": str(total),
                                   f"stage_defs.{last}.in_batch_negatives": "true,false"}
    pooling = (recipe.get("model") or {}).get("pooling") or {}
    if pooling.get("mode", "latent_attention") == "latent_attention":
        flip = "false" if pooling.get("zero_init_residual", True) else "true"
        out["zero_init_residual"] = {"model.pooling.zero_init_residual": flip}
    return out


def setting_name(overrides: Dict[str, str], defaults: Dict[str, str]) -> str:
    """A readable name for one setting: the values that differ from the recipe's (``mode=mean+causal``), else
    ``reference``."""
    parts = []
    for k, v in overrides.items():
        v = v.lower() if v in ("True", "False") else v  # Hydra writes a swept bool as True/False
        if k == "seed" or defaults.get(k) == v:
            continue
        if k == "model.bidirectional":
            parts.append("causal" if v == "false" else "bidirectional")
        elif k == "stages":
            parts.append("one stage (" + v.strip("[]") + ")")
        else:
            parts.append(f"{k.rsplit('.', 1)[-1]}={v}")
    return "+".join(parts) or REFERENCE


def recipe_defaults(recipe: Dict[str, Any], keys: Sequence[str]) -> Dict[str, str]:
    """The recipe's own value of each dotted key, as an override string (``true``, ``mean``); schema defaults for
    the keys a recipe may leave out."""
    out = {}
    defaults = {"model.pooling.mode": "latent_attention", "model.bidirectional": True,
                "model.pooling.zero_init_residual": True}
    for key in keys:
        node: Any = recipe
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            node = defaults.get(key)
        if node is not None:
            out[key] = str(node).lower() if isinstance(node, bool) else str(node)
    return out


def aggregate(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows (``group``, ``setting``, ``seed``, ``result``) -> one line per (group, setting): n, and the mean and
    sample standard deviation over seeds of the suite average and of each task type's average (x100)."""
    keyed: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["group"], r["setting"]), []).append(r)
    out = []
    for (group, setting), rs in keyed.items():
        line: Dict[str, Any] = {"group": group, "setting": setting, "n": len(rs),
                                "seeds": sorted(r["seed"] for r in rs)}
        for key in ("all",) + TYPES:
            line[key] = mean_std([100 * r["result"]["average"][key] for r in rs
                                  if key in r["result"].get("average", {})])
        tasks = sorted({t for r in rs for t in r["result"].get("tasks", {})})
        line["tasks"] = {t: mean_std([100 * r["result"]["tasks"][t]["main_score"] for r in rs
                                      if t in r["result"]["tasks"]]) for t in tasks}
        out.append(line)
    return out


def format_table(lines: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one row per setting, mean ± sample std over seeds (x100), and the difference of the suite average
    from the reference of the same ablation."""
    ref = next((ln for ln in lines if ln["setting"] == REFERENCE), None)
    head = ["group", "setting", "seeds", "avg", "Δ avg vs reference"] + list(TYPES)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for ln in lines:
        delta = "-" if ref is None or ln["all"][0] is None or ln is ref else f"{ln['all'][0] - ref['all'][0]:+.2f}"
        cells = [ln["group"], ln["setting"], str(ln["n"]), cell(ln["all"]), delta] + [cell(ln[t]) for t in TYPES]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(lines: Sequence[Dict[str, Any]], path: str) -> str:
    """Bar chart of each setting's suite average with its standard deviation over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [ln for ln in lines if ln["all"][0] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(shown) + 2), 4))
    xs = range(len(shown))
    ax.bar(xs, [ln["all"][0] for ln in shown], yerr=[ln["all"][1] for ln in shown], capsize=4,
           color=["tab:green" if ln["setting"] == REFERENCE else "tab:blue" for ln in shown])
    ax.set_xticks(list(xs))
    ax.set_xticklabels([ln["setting"] for ln in shown], rotation=30, ha="right", fontsize=8)
    lo = min(ln["all"][0] - ln["all"][1] for ln in shown) if shown else 0
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_ylabel("suite average x100 (mean ± std over seeds)")
    ax.set_title("ablations (green: the recipe's NV-Embed choices)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(recipe: str, out_dir: str, *, seeds: Sequence[int], only: Optional[Sequence[str]] = None,
        suite: Optional[str] = None, extra: Sequence[str] = (), log: Callable[[str], None] = print,
        train: bool = True) -> Dict[str, str]:
    """Run (or continue) every group's sweep, evaluate each finished run, write ``OUT/ablations.{json,md,png}``.
    Returns the paths written. ``train=False`` only evaluates and tabulates what is there."""
    from ..rundir import RunDir
    from .suite import load_suite

    check_seeds(seeds)
    check_extra(extra)
    composed = load_recipe(recipe, extra)
    plan = groups(composed)
    if only:
        unknown = [g for g in only if g not in plan]
        if unknown:
            raise ExperimentError(f"--groups: unknown {unknown} for recipe {recipe}; groups: {sorted(plan)}")
        plan = {g: plan[g] for g in only}
    suite = resolve_suite(composed, suite)
    load_suite(suite)  # a bad suite fails before hours of training
    defaults = recipe_defaults(composed, sorted({k for o in plan.values() for k in o}))
    rows: List[Dict[str, Any]] = []
    failed: List[str] = []
    for group, overrides in plan.items():
        gdir = os.path.join(out_dir, group)
        if train:
            # the group's values win over --set for the keys it varies (e.g. one_stage's total steps)
            rest = [e for e in extra if e.split("=", 1)[0].lstrip("+") not in overrides]
            cmd = sweep_command(recipe, gdir, seeds, rest + [f"{k}={v}" for k, v in overrides.items()],
                                resume=os.path.isfile(os.path.join(gdir, "sweep.json")))
            log("[ablate] " + " ".join(cmd))
            code = subprocess.run(cmd).returncode
            if code != 0:
                failed.append(f"{group} (exit {code})")
                log(f"[ablate] sweep {group} exited with {code}; tabulating the runs that finished")
        table = read_json(os.path.join(gdir, "sweep.json"))
        for r in (table or {}).get("runs", []):
            ov = {k: str(v) for k, v in r["overrides"].items()}
            run_dir = RunDir(os.path.join(gdir, r["run"]))
            if "seed" not in ov or int(ov["seed"]) not in seeds or not os.path.isfile(
                    os.path.join(run_dir.final, "config.json")):
                continue
            res = evaluate_export(run_dir.final, suite, os.path.join(run_dir.root, EVAL_FILE),
                                  run_dir.load_config().eval.max_length, log)
            rows.append({"group": group, "setting": setting_name({**overrides, **ov}, defaults),
                         "seed": int(ov["seed"]), "run": run_dir.root, "result": res})
    lines = aggregate(rows)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "ablations.json"), "md": os.path.join(out_dir, "ablations.md")}
    write_json(paths["json"], {"recipe": recipe, "extra": list(extra), "suite": suite, "seeds": list(seeds),
                               "settings": lines,
                               "runs": [{**{k: v for k, v in r.items() if k != "result"},
                                         "average": r["result"]["average"]} for r in rows]})
    with open(paths["md"], "w") as f:
        f.write(f"Recipe `{recipe}`{' with ' + ' '.join(extra) if extra else ''}, suite `{suite}`, seeds "
                f"{list(seeds)}. Scores x100, mean ± sample std over seeds.\n\n" + format_table(lines) + "\n")
    if lines:
        paths["png"] = plot(lines, os.path.join(out_dir, "ablations.png"))
    if failed:  # after the table: the runs that finished are not lost
        raise ExperimentError(f"sweeps failed: {', '.join(failed)}; the table in {paths['md']} holds the runs that "
                              f"finished; re-run the same command to continue")
    return paths
