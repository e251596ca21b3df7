"""Evaluation during training: before the first stage, after each stage, and the final results table.

Results go to ``DIR/eval/<label>.json``; a resumed run reuses what was already measured. Reference rows
(``eval.baselines``: ``bm25`` or a sentence-transformers folder such as all-MiniLM-L6-v2) are measured once.
The table is printed and saved as ``DIR/eval/results.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..cli import resolve_path


class EmbedderEncoder:
    """The training model seen through the evaluation encoder protocol."""

    def __init__(self, embedder, name: str, max_length: int, autocast):
        self.embedder, self.name, self.max_length, self.autocast = embedder, name, max_length, autocast

    def encode(self, texts, *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        with self.autocast():
            return self.embedder.encode(list(texts), instruction=instruction, batch_size=batch_size,
                                        max_length=self.max_length, show_progress=show_progress)


def _suites(cfg) -> List[str]:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "data_specs", "eval")
    out = []
    for s in cfg.eval.suites:
        p = s if os.path.isabs(s) or os.path.exists(s) else os.path.join(root, s)
        if not os.path.exists(p):
            raise FileNotFoundError(f"eval.suites: no such suite {s} (looked in {root})")
        out.append(p)
    return out


def _run_suites(encoder, cfg, log) -> Dict[str, Any]:
    from ..eval.suite import run_suite

    merged: Dict[str, Any] = {"model": encoder.name, "tasks": {}, "average": {}, "seconds": 0.0}
    for path in _suites(cfg):
        res = run_suite(encoder, path, batch_size=cfg.eval.batch_size, log=log)
        merged["tasks"].update(res["tasks"])
        merged["seconds"] += res["seconds"]
    by_type: Dict[str, List[float]] = {}
    for r in merged["tasks"].values():
        if r.get("main_score") is not None:
            by_type.setdefault(r["type"], []).append(r["main_score"])
    merged["average"] = {t: float(np.mean(v)) for t, v in by_type.items()}
    if by_type:
        merged["average"]["all"] = float(np.mean([x for v in by_type.values() for x in v]))
    return merged


def maybe_evaluate(trainer, label: str) -> Optional[Dict[str, Any]]:
    cfg = trainer.cfg
    if not cfg.eval.enabled:
        return None
    acc = trainer.accelerator
    folder = os.path.join(trainer.out, "eval")
    path = os.path.join(folder, f"{label}.json")
    result = None
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
    elif acc.is_main_process:
        trainer._log_line(f"evaluating ({label})")
        enc = EmbedderEncoder(acc.unwrap_model(trainer.model), label, cfg.eval.max_length, acc.autocast)
        result = _run_suites(enc, cfg, None)
        os.makedirs(folder, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)
        trainer._log_line(f"{label}: average {result['average']} ({result['seconds']:.0f}s)")
        trainer.tracker.log({"event": "eval", "label": label, "global_step": trainer.global_step,
                             **{f"eval/{k}": v for k, v in result["average"].items()}})
    acc.wait_for_everyone()
    return result


def _baseline(trainer, spec: str) -> Dict[str, Any]:
    from ..eval.encoders import load_encoder

    name = "bm25" if spec.lower() == "bm25" else os.path.basename(os.path.normpath(spec))
    if name in ("model", ""):
        name = os.path.basename(os.path.dirname(os.path.normpath(spec)))
    path = os.path.join(trainer.out, "eval", f"baseline_{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    trainer._log_line(f"evaluating reference {name}")
    enc = load_encoder(resolve_baseline(spec), name=name)
    with torch.no_grad():
        result = _run_suites(enc, trainer.cfg, None)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def resolve_baseline(spec: str) -> str:
    """``bm25``, a folder, or ``pkg://package/sub/folder`` inside an installed package."""
    if spec.startswith("pkg://"):
        import importlib.util

        package, _, rel = spec[len("pkg://"):].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"eval.baselines: package '{package}' is not installed")
        return os.path.join(list(found.submodule_search_locations)[0], rel)
    return resolve_path(spec)


def write_report(trainer) -> Optional[str]:
    """Print and save the table: reference rows, untrained, after each stage."""
    cfg = trainer.cfg
    if not cfg.eval.enabled or not trainer.accelerator.is_main_process:
        return None
    from ..eval.suite import format_results_table, write_bar_chart

    folder = os.path.join(trainer.out, "eval")
    rows: Dict[str, Any] = {}
    for spec in cfg.eval.baselines:
        res = _baseline(trainer, spec)
        rows[res["model"]] = res
    for label in ["untrained"] + [f"after_{s}" for s in cfg.stages]:
        p = os.path.join(folder, f"{label}.json")
        if os.path.isfile(p):
            with open(p) as f:
                rows[label] = json.load(f)
    table = format_results_table(rows)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(table + "\n")
    write_bar_chart(rows, os.path.join(folder, "results.png"), title="nvembed demo: main score per task (x100)")
    print("\n" + table + "\n", flush=True)
    trainer._log_line(f"results: {os.path.join(folder, 'results.md')} (+ .json, .png)")
    return table
