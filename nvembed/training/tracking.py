"""Metrics: ``metrics.jsonl`` (the source of truth), W&B (offline by default), TensorBoard, a loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from ..config import LoggingConfig
from ..export.model_card import scrub  # one secret scrubber for run folders, logs and model cards

__all__ = ["Tracker", "scrub", "read_rows", "read_metrics", "plot_loss_curves"]


class Tracker:
    def __init__(self, output_dir: str, cfg: LoggingConfig, run_config: Dict[str, Any], enabled: bool = True,
                 resume_after: Optional[Dict[str, int]] = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.output_dir = output_dir
        self.enabled = enabled
        self._wandb = None
        self._wandb_step = -1
        self._tb = None
        if not enabled:
            return
        purge = self._truncate(resume_after) if resume_after is not None else None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard then hides what the interrupted run logged after the checkpoint (the
                # resume logs those steps again), as _truncate drops those rows from metrics.jsonl
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)
            except Exception as e:  # tensorboard is optional at run time
                print(f"[nvembed] TensorBoard disabled: {e}")
        if cfg.wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb
                self._wandb = wandb.init(project=cfg.wandb_project, dir=output_dir, mode=cfg.wandb_mode,
                                         config=scrub(run_config), resume="allow",
                                         id=_run_id(output_dir), settings=wandb.Settings(silent=True))
            except Exception as e:
                print(f"[nvembed] W&B disabled: {e}")

    def _truncate(self, keep: Dict[str, int]) -> Optional[int]:
        """On resume, drop rows logged after the checkpoint so the log equals an uninterrupted run's. Returns the
        first global step dropped (None if none was)."""
        if not os.path.isfile(self.path):
            return None
        rows = read_rows(self.path)
        after = [r.get("event") == "step" and r["step"] > keep.get(r["stage"], 10**12) for r in rows]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r, drop in zip(rows, after) if not drop)
        os.replace(self.path + ".tmp", self.path)
        return min((r["global_step"] for r, drop in zip(rows, after) if drop), default=None)

    def log(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("global_step")
        numeric = {f"{row.get('stage', 'run')}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and k not in ("step", "global_step")}
        if self._tb is not None and step is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            # W&B's step never goes back, and a log without step= advances it: then the next training step (the
            # stage summary and an eval come after a stage's last step) would be dropped. Rows without a step or
            # sharing one are merged into the current step instead.
            at = max(self._wandb_step if step is None else step, self._wandb_step, 0)
            self._wandb.log(numeric, step=at)
            self._wandb_step = at

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _run_id(output_dir: str) -> str:
    import hashlib
    return hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:12]


def read_rows(path: str) -> List[Dict[str, Any]]:
    """Rows of a metrics.jsonl. A torn last line (the run was killed while appending it) is dropped with a warning:
    it belongs to a step that a resume runs again. A bad line elsewhere is an error naming the file and line."""
    from .checkpoint import RunDirError, warn

    with open(path) as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if any(l.strip() for l in lines[i:]):
                raise RunDirError(f"{path} line {i} is not JSON ({e.msg}); repair or remove that line") from None
            warn(f"{path} line {i} is torn (a partial row: the run stopped while writing it); dropped (a resume "
                 f"runs again the steps after its checkpoint)")
    return rows


def read_metrics(output_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(output_dir, "metrics.jsonl")
    return read_rows(path) if os.path.isfile(path) else []


def plot_loss_curves(output_dir: str) -> Optional[str]:
    rows = [r for r in read_metrics(output_dir) if r.get("event") == "step"]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        pts = [(r["global_step"], r["loss"]) for r in rows if r["stage"] == stage and r.get("loss") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=stage)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("nvembed training loss")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, "loss_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
