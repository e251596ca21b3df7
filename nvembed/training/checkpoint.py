"""Run directory layout, atomic checkpoints and exact resume.

Layout::

    DIR/run.json                      marks the folder as an nvembed run (refuse to overwrite it)
    DIR/config.yaml                   the validated config (secrets scrubbed)
    DIR/<stage>/checkpoint-<step>/    weights (safetensors), optimizer.pt, scheduler.pt, rng.json (per rank), state.json
    DIR/<stage>/final/                stage weights + state.json (complete: true)
    DIR/final/                        exported model (transformers + sentence-transformers)

A checkpoint is written into a temporary sibling folder and renamed into place only once complete, so a run killed
while saving leaves the previous checkpoint loadable. Pickle-based files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import UserError

STATE = "state.json"
RUN_MARKER = "run.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(UserError, RuntimeError):
    """The output folder cannot be used as asked (it holds another run, or no run to resume)."""

    kind = "run folder"


def guard_output_dir(output_dir: str, resume: bool) -> None:
    """Refuse to start a fresh run on top of an existing one."""
    marker = os.path.join(output_dir, RUN_MARKER)
    if resume:
        if not os.path.isfile(marker):
            raise RunDirError(f"resume=true but {output_dir} holds no nvembed run (no {RUN_MARKER}); "
                              f"start without resume=true")
        return
    if os.path.isfile(marker) or (os.path.isdir(output_dir) and any(
            n in os.listdir(output_dir) for n in ("metrics.jsonl", "final", "config.yaml"))):
        raise RunDirError(f"output_dir {output_dir} already holds a run; pass resume=true to continue it, "
                          f"or choose a new output_dir. Nothing was changed.")


def write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- RNG ---------------------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- checkpoints -------------------------------------------------------------------------------------------------
def checkpoints(stage_dir: str) -> List[str]:
    """Complete checkpoints of a stage, oldest first."""
    if not os.path.isdir(stage_dir):
        return []
    found = []
    for name in os.listdir(stage_dir):
        m = _CKPT.match(name)
        if m and os.path.isfile(os.path.join(stage_dir, name, STATE)):
            found.append((int(m.group(1)), os.path.join(stage_dir, name)))
    return [p for _, p in sorted(found)]


def read_state(folder: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, STATE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_checkpoint(folder: str, *, embedder, optimizer, scheduler, state: Dict[str, Any],
                    accelerator=None, weights: Optional[Dict[str, torch.Tensor]] = None, keep_last: int = 0,
                    rng_states: Optional[List[Dict[str, Any]]] = None) -> str:
    """Write a complete checkpoint atomically; prune to the newest ``keep_last`` in its stage folder.
    ``rng_states``: every rank's :func:`rng_state` (default: this process's only)."""
    parent = os.path.dirname(folder.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(folder)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    embedder.save_weights(tmp, weights)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    with open(os.path.join(tmp, "rng.json"), "w") as f:
        json.dump(rng_states or [rng_state()], f)
    state = dict(state, saved_at=time.time())
    write_json_atomic(os.path.join(tmp, STATE), state)  # written last: its presence means "complete"
    publish(tmp, folder, keep_last)
    return folder


def publish(tmp: str, folder: str, keep_last: int = 0) -> None:
    """Move a complete temporary checkpoint into place (replacing an older one of the same name) and prune."""
    if os.path.exists(folder):
        old = f"{tmp}.old"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    if keep_last > 0:
        for stale in checkpoints(os.path.dirname(folder.rstrip("/")))[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(folder: str, *, embedder, optimizer=None, scheduler=None, restore_rng: bool = True,
                    rank: int = 0) -> Dict[str, Any]:
    state = read_state(folder)
    if state is None:
        raise RunDirError(f"{folder} is not a complete checkpoint (no {STATE})")
    embedder.load_weights(folder)
    if optimizer is not None and os.path.isfile(os.path.join(folder, "optimizer.pt")):
        optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location="cpu"))
    if scheduler is not None and os.path.isfile(os.path.join(folder, "scheduler.pt")):
        scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
    if restore_rng and os.path.isfile(os.path.join(folder, "rng.json")):
        with open(os.path.join(folder, "rng.json")) as f:
            states = json.load(f)
        states = states if isinstance(states, list) else [states]  # older checkpoints: one process's state
        set_rng_state(states[rank % len(states)])  # each rank its own: dropout draws differ between ranks
    return state


def clean_temporaries(stage_dir: str) -> None:
    """Remove folders left by a save that was interrupted."""
    if os.path.isdir(stage_dir):
        for name in os.listdir(stage_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(stage_dir, name), ignore_errors=True)
