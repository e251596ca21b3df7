"""Evaluation during training: before the first stage, after each stage, and the final results table.

Results go to ``DIR/eval/<label>.json``; a resumed run reuses what was already measured. With
``eval.truncate_dims`` each label is also measured on embeddings truncated to d dims (``DIR/eval/<label>@<d>.json``,
rows ``<label>@<d>`` in the table). Reference rows
(``eval.baselines``: ``bm25`` or a sentence-transformers folder such as all-MiniLM-L6-v2) are measured once.
The table is printed and saved as ``DIR/eval/results.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ..paths import eval_suites_root, package_path, resolve_path
from ..rundir import RunDir


class EmbedderEncoder:
    """The training model seen through the evaluation encoder protocol: the exported model's own ``encode``, with
    the precision passed explicitly (``autocast_dtype``), as a user of the export would pass it."""

    def __init__(self, embedder, name: str, max_length: int, autocast_dtype: Optional[torch.dtype] = None):
        self.embedder, self.name, self.max_length, self.autocast_dtype = embedder, name, max_length, autocast_dtype

    def encode(self, texts, *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        return self.embedder.encode(list(texts), instruction=instruction, batch_size=batch_size,
                                    max_length=self.max_length, show_progress=show_progress,
                                    autocast_dtype=self.autocast_dtype)


def autocast_dtype(acc) -> Optional[torch.dtype]:
    """The dtype ``acc.autocast()`` runs forwards in: bf16/fp16 under native mixed precision; None for fp32 and
    under DeepSpeed (its weights carry the precision)."""
    if not getattr(acc, "native_amp", False):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision))


def suite_paths(cfg) -> List[str]:
    """The files of ``eval.suites`` (absolute, from the working directory, or under ``data_specs/eval``)."""
    root = eval_suites_root()
    out = [resolve_path(s, [root]) for s in cfg.eval.suites]
    for s, p in zip(cfg.eval.suites, out):
        if not os.path.exists(p):
            raise FileNotFoundError(f"eval.suites: no such suite {s} (looked in {root})")
    return out


class _TaskMemo:
    """Encodes each (texts, instruction) once: the truncated evaluations of a task reuse the full embeddings.
    Cleared after every task, so it never holds more than one task's vectors."""

    def __init__(self, encoder):
        self.encoder, self.name, self.cache = encoder, encoder.name, {}

    def encode(self, texts, *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        key = (instruction, tuple(texts))
        if key not in self.cache:
            self.cache[key] = np.asarray(self.encoder.encode(list(texts), instruction=instruction,
                                                             batch_size=batch_size, show_progress=show_progress))
        return self.cache[key].copy()  # evaluators may modify what they get


def _run_suites(encoder, cfg, log, truncate_dims=()) -> Dict[str, Any]:
    """Every suite of ``cfg.eval`` on ``encoder``. With ``truncate_dims``, returns ``{None: full result, d: result
    with embeddings truncated to d dims}``; without, the full result."""
    from ..eval.encoders import BM25Retriever, TruncatedEncoder
    from ..eval.suite import load_suite, run_task

    dims = list(truncate_dims)
    memo = encoder if not dims or isinstance(encoder, BM25Retriever) else _TaskMemo(encoder)
    encs = {None: memo, **{d: TruncatedEncoder(memo, d, name=f"{encoder.name}@{d}") for d in dims}}
    merged = {d: {"model": e.name, "tasks": {}, "average": {}, "seconds": 0.0} for d, e in encs.items()}
    for path in suite_paths(cfg):
        suite = load_suite(path)
        for task in suite["tasks"]:
            for d, enc in encs.items():
                res = run_task(enc, task, suite["root"], batch_size=cfg.eval.batch_size or suite["batch_size"],
                               seed=suite["seed"])
                merged[d]["tasks"][task["name"]] = res
                merged[d]["seconds"] += res.get("seconds", 0.0)
                if log:
                    log(f"[{suite['name']}] {task['name']}{'' if d is None else f'@{d}'}: {res}")
            if isinstance(memo, _TaskMemo):
                memo.cache.clear()
    for m in merged.values():
        by_type: Dict[str, List[float]] = {}
        for r in m["tasks"].values():
            if r.get("main_score") is not None:
                by_type.setdefault(r["type"], []).append(r["main_score"])
        m["average"] = {t: float(np.mean(v)) for t, v in by_type.items()}
        if by_type:
            m["average"]["all"] = float(np.mean([x for v in by_type.values() for x in v]))
    return merged if dims else merged[None]


def _labels(label: str, cfg) -> Dict[Any, str]:
    """Result label per truncation: ``{None: label, 256: label@256, ...}``."""
    return {None: label, **{int(d): f"{label}@{int(d)}" for d in cfg.eval.truncate_dims}}


class Evaluation:
    """The training run's evaluation hook: ``evaluate(label, step)`` before the first stage and after each stage,
    ``report()`` at the end. Built with what it needs; it never sees the trainer.

    ``model``: the Embedder being trained (encoded through its ``encode``); ``sharded``: whether its forwards are
    collectives every rank must join (ZeRO-3), asked at each evaluation; ``log``: one-line progress messages."""

    def __init__(self, cfg, run: RunDir, *, accelerator, model, sharded: Callable[[], bool], tracker,
                 log: Callable[[str], None]):
        self.cfg, self.run, self.acc, self.model = cfg, run, accelerator, model
        self.sharded, self.tracker, self.log = sharded, tracker, log

    def evaluate(self, label: str, step: int) -> Optional[Dict[str, Any]]:
        cfg, acc = self.cfg, self.acc
        if not cfg.eval.enabled:
            return None
        labels = _labels(label, cfg)
        paths = {d: self.run.eval_file(lab) for d, lab in labels.items()}
        result = results = None
        # a resumed run reuses what was measured; truncations added later are measured then
        if all(os.path.isfile(p) for p in paths.values()):
            with open(paths[None]) as f:
                result = json.load(f)
        elif acc.is_main_process or self.sharded():
            # ZeRO-3: every forward gathers weights from all ranks, so every rank encodes (the same texts); rank 0
            # writes
            self.log(f"evaluating ({label})")
            enc = EmbedderEncoder(self.model, label, cfg.eval.max_length, autocast_dtype(acc))
            dims = [d for d in labels if d is not None]
            results = _run_suites(enc, cfg, None, dims) if dims else {None: _run_suites(enc, cfg, None)}
        if results is not None and acc.is_main_process:
            os.makedirs(self.run.eval_dir, exist_ok=True)
            for d, res in results.items():
                res["model"] = labels[d]
                if os.path.isfile(paths[d]):
                    continue
                with open(paths[d] + ".tmp", "w") as f:
                    json.dump(res, f, indent=2)
                os.replace(paths[d] + ".tmp", paths[d])
                self.log(f"{labels[d]}: average {res['average']} ({res['seconds']:.0f}s)")
                prefix = "eval" if d is None else f"eval@{d}"
                self.tracker.log({"event": "eval", "label": labels[d], "global_step": step,
                                  **{f"{prefix}/{k}": v for k, v in res["average"].items()}})
            with open(paths[None]) as f:
                result = json.load(f)
        acc.wait_for_everyone()
        return result

    def _baseline(self, spec: str) -> Dict[str, Any]:
        from ..eval.encoders import load_encoder

        name, _, target = spec.partition("=") if "=" in spec else ("", "", spec)
        spec = target
        if not name:
            name = "bm25" if spec.lower() == "bm25" else os.path.basename(os.path.normpath(spec))
        if name in ("model", ""):
            name = os.path.basename(os.path.dirname(os.path.normpath(spec)))
        path = self.run.eval_file(f"baseline_{name}")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        self.log(f"evaluating reference {name}")
        enc = load_encoder(resolve_baseline(spec), name=name)
        with torch.no_grad():
            result = _run_suites(enc, self.cfg, None)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        return result

    def report(self) -> Optional[str]:
        """Print and save the table (main process): reference rows, untrained, after each stage."""
        cfg = self.cfg
        if not cfg.eval.enabled or not self.acc.is_main_process:
            return None
        from ..eval.suite import format_results_table, write_bar_chart

        folder = self.run.eval_dir
        rows: Dict[str, Any] = {}
        for spec in cfg.eval.baselines:
            res = self._baseline(spec)
            rows[res["model"]] = res
        for base in ["untrained"] + [f"after_{s}" for s in cfg.stages]:
            for label in _labels(base, cfg).values():  # each label, then its truncations (label@d)
                p = self.run.eval_file(label)
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
        self.log(f"results: {os.path.join(folder, 'results.md')} (+ .json, .png)")
        return table


def resolve_baseline(spec: str) -> str:
    """``bm25``, a folder, or ``pkg://package/sub/folder`` inside an installed package."""
    return package_path(resolve_path(spec), what="eval.baselines")
