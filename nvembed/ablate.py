"""Ablations of the NV-Embed choices: one Hydra sweep per group of settings, every setting over several seeds, each
run's exported model evaluated on a held-out suite, then mean and spread per setting.

Groups (each compared with the reference: the recipe as written, NV-Embed's choices):

* ``pooling_attention``: pooling {latent_attention, mean, last_token} x attention {bidirectional, causal};
* ``stage2_in_batch``: stage 2 with in-batch negatives on (NV-Embed turns them off);
* ``one_stage``: stage 1 only, for as many steps as both stages together (equal compute);
* ``zero_init_residual``: the latent-attention head's residual branches initialised randomly instead of at zero.

Layout: ``OUT/GROUP/`` is a sweep folder (``sweep.md``; one run folder per setting and seed, named by Hydra from the
swept keys), ``OUT/GROUP/RUN/ablation_eval.json`` the suite result of that run's ``final/`` export, and
``OUT/ablations.{json,md,png}`` the table over every group. Re-running continues: finished runs and evaluations are
kept, missing ones are started.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import UserError

REFERENCE = "reference"
EVAL_FILE = "ablation_eval.json"
TYPES = ("retrieval", "sts", "classification", "clustering")


class AblationError(UserError, ValueError):
    """An ablation request is invalid (unknown group, bad seed list); the message names the argument."""

    kind = "ablation"


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
    pooling = (recipe.get("model") or {}).get("pooling") or {}
    if pooling.get("mode", "latent_attention") == "latent_attention":
        flip = "false" if pooling.get("zero_init_residual", True) else "true"
        out["zero_init_residual"] = {"model.pooling.zero_init_residual": flip}
    return out


def setting_name(group: str, overrides: Dict[str, str], swept_defaults: Dict[str, str]) -> str:
    """A readable name for one setting: the values that differ from the recipe's (``mean+causal``), else
    ``reference``."""
    parts = []
    for k, v in overrides.items():
        if k == "seed" or swept_defaults.get(k) == v:
            continue
        if k == "model.bidirectional":
            parts.append("causal" if v == "false" else "bidirectional")
        elif k == "stages":
            parts.append("one stage (" + v.strip("[]") + ")")
        else:
            parts.append(f"{k.rsplit('.', 1)[-1]}={v}")
    return "+".join(parts) or REFERENCE


def recipe_defaults(recipe: Dict[str, Any], keys: Sequence[str]) -> Dict[str, str]:
    """The recipe's own value of each dotted key, as an override string (``true``, ``mean``)."""
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


def sweep_command(recipe: str, out_dir: str, overrides: Dict[str, str], seeds: Sequence[int],
                  extra: Sequence[str], resume: bool) -> List[str]:
    """``train/train.py -m`` over the group's settings and the seeds; evaluation is done afterwards, on the export."""
    from .paths import SOURCE_ROOT

    cmd = [sys.executable, os.path.join(SOURCE_ROOT, "train", "train.py"), "-m", f"--config-name={recipe}",
           f"output_dir={out_dir}", "seed=" + ",".join(str(s) for s in seeds), "eval.enabled=false",
           "export_final=true"]
    cmd += [f"{k}={v}" for k, v in overrides.items()] + list(extra)
    if resume:
        cmd.append("resume=true")
    return cmd


def evaluate_run(run_dir: str, suite: str, log: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """The suite result of ``RUN/final`` (cached in ``RUN/ablation_eval.json``); None when the run has no export."""
    final = os.path.join(run_dir, "final")
    path = os.path.join(run_dir, EVAL_FILE)
    if not os.path.isfile(os.path.join(final, "config.json")):
        return None
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(final, "config.json")):
        with open(path) as f:
            return json.load(f)
    from .eval.encoders import load_encoder
    from .eval.suite import run_suite

    log(f"[ablate] evaluating {final}")
    res = run_suite(load_encoder(final), suite)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, path)
    return res


def _mean_std(vals: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def aggregate(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows (``group``, ``setting``, ``seed``, ``result``) -> one line per (group, setting): n, and the mean and
    sample standard deviation over seeds of the suite average and of each task type's average (x100)."""
    keyed: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["group"], r["setting"]), []).append(r)
    out = []
    for (group, setting), rs in keyed.items():
        line: Dict[str, Any] = {"group": group, "setting": setting, "n": len(rs),
                                "seeds": sorted(r["seed"] for r in rs)}
        for key in ("all",) + TYPES:
            vals = [100 * r["result"]["average"][key] for r in rs if key in r["result"].get("average", {})]
            line[key] = _mean_std(vals)
        tasks = sorted({t for r in rs for t in r["result"].get("tasks", {})})
        line["tasks"] = {t: _mean_std([100 * r["result"]["tasks"][t]["main_score"] for r in rs
                                       if t in r["result"]["tasks"]]) for t in tasks}
        out.append(line)
    return out


def _cell(ms: Tuple[Optional[float], Optional[float]]) -> str:
    m, sd = ms
    return "-" if m is None else f"{m:.2f} ± {sd:.2f}"


def format_table(lines: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one row per setting, mean ± sample std over seeds (x100), and the difference of the suite average
    from the reference of the same run."""
    ref = next((l for l in lines if l["setting"] == REFERENCE), None)
    head = ["group", "setting", "seeds", "avg", "Δ avg vs reference"] + [t for t in TYPES]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for l in lines:
        delta = "-" if ref is None or l["all"][0] is None or l is ref else f"{l['all'][0] - ref['all'][0]:+.2f}"
        cells = [l["group"], l["setting"], str(l["n"]), _cell(l["all"]), delta] + [_cell(l[t]) for t in TYPES]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(lines: Sequence[Dict[str, Any]], path: str) -> str:
    """Bar chart of each setting's suite average with its standard deviation over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [l for l in lines if l["all"][0] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(shown) + 2), 4))
    xs = range(len(shown))
    ax.bar(xs, [l["all"][0] for l in shown], yerr=[l["all"][1] for l in shown], capsize=4,
           color=["tab:green" if l["setting"] == REFERENCE else "tab:blue" for l in shown])
    ax.set_xticks(list(xs))
    ax.set_xticklabels([l["setting"] for l in shown], rotation=30, ha="right", fontsize=8)
    lo = min(l["all"][0] - l["all"][1] for l in shown) if shown else 0
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_ylabel("suite average x100 (mean ± std over seeds)")
    ax.set_title("ablations (green: the recipe's NV-Embed choices)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_recipe(recipe: str, extra: Sequence[str]) -> Dict[str, Any]:
    """The recipe YAML with the user's extra ``key=value`` overrides applied, as a plain dict."""
    from omegaconf import OmegaConf

    from .paths import recipes_root

    path = os.path.join(recipes_root(), recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    if not os.path.isfile(path):
        raise AblationError(f"--recipe: no recipe {path}")
    cfg = OmegaConf.load(path)
    dotlist = [e.lstrip("+") for e in extra if "=" in e and not e.startswith("~")]
    return OmegaConf.to_container(OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist)), resolve=True)


def default_suite(recipe: Dict[str, Any]) -> str:
    """The recipe's first evaluation suite (as the trainer resolves it), else the demo suite."""
    from .paths import eval_suites_root, resolve_path

    suites = ((recipe.get("eval") or {}).get("suites")) or ["demo.yaml"]
    s = suites[0]
    return s if os.path.isabs(s) or os.path.exists(s) else os.path.join(eval_suites_root(), s)


def run(recipe: str, out_dir: str, *, seeds: Sequence[int], only: Optional[Sequence[str]] = None,
        suite: Optional[str] = None, extra: Sequence[str] = (), log: Callable[[str], None] = print,
        train: bool = True) -> Dict[str, str]:
    """Run (or continue) every group's sweep, evaluate each finished run, write ``OUT/ablations.{json,md,png}``.
    Returns the paths written. ``train=False`` only evaluates and tabulates what is there."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise AblationError(f"--seeds: give distinct seeds, got {list(seeds)}")
    composed = load_recipe(recipe, extra)
    plan = groups(composed)
    if only:
        unknown = [g for g in only if g not in plan]
        if unknown:
            raise AblationError(f"--groups: unknown {unknown} for recipe {recipe}; groups: {sorted(plan)}")
        plan = {g: plan[g] for g in only}
    suite = suite or default_suite(composed)
    from .eval.suite import load_suite

    load_suite(suite)  # a bad suite fails before hours of training
    swept_keys = sorted({k for o in plan.values() for k in o})
    defaults = recipe_defaults(composed, swept_keys)
    rows: List[Dict[str, Any]] = []
    failed: List[str] = []
    for group, overrides in plan.items():
        gdir = os.path.join(out_dir, group)
        if train:
            resume = os.path.isfile(os.path.join(gdir, "sweep.json"))
            cmd = sweep_command(recipe, gdir, overrides, seeds, extra, resume)
            log("[ablate] " + " ".join(cmd))
            done = subprocess.run(cmd)
            if done.returncode != 0:
                failed.append(f"{group} (exit {done.returncode})")
                log(f"[ablate] sweep {group} exited with {done.returncode}; tabulating the runs that finished")
        table = os.path.join(gdir, "sweep.json")
        if not os.path.isfile(table):
            continue
        with open(table) as f:
            runs = json.load(f)["runs"]
        for r in runs:
            ov = {k: str(v) for k, v in r["overrides"].items()}
            if "seed" not in ov or int(ov["seed"]) not in seeds:
                continue
            res = evaluate_run(os.path.join(gdir, r["run"]), suite, log)
            if res is None:
                continue
            full = {**overrides, **ov}
            rows.append({"group": group, "setting": setting_name(group, full, defaults), "seed": int(ov["seed"]),
                         "run": os.path.join(gdir, r["run"]), "result": res})
    lines = aggregate(rows)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "ablations.json"), "md": os.path.join(out_dir, "ablations.md")}
    with open(paths["json"], "w") as f:
        json.dump({"recipe": recipe, "extra": list(extra), "suite": suite, "seeds": list(seeds), "settings": lines,
                   "runs": [{k: v for k, v in r.items() if k != "result"} | {"average": r["result"]["average"]}
                            for r in rows]}, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(format_table(lines) + "\n")
    if lines:
        paths["png"] = plot(lines, os.path.join(out_dir, "ablations.png"))
    if failed:  # after the table: the runs that finished are not lost
        raise AblationError(f"sweeps failed: {', '.join(failed)}; the table in {paths['md']} holds the runs that "
                            f"finished; re-run the same command to continue")
    return paths
