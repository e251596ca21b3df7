"""Atomic checkpoints and exact resume (the run folder's layout itself: ``nvembed.rundir``).

A checkpoint is written into a temporary sibling folder and renamed into place only once complete, so a run killed
while saving leaves the previous checkpoint loadable. Resume verifies the manifest (:func:`verify`): a newest
checkpoint that is truncated, lacks a file or lacks its manifest is named in a warning and skipped for the previous
complete one. Free space is checked before a save (:func:`check_free_space`); a full disk mid-save is reported as a
:class:`DiskFullError` and the temporary folder removed. ``optimizer.pt`` / ``scheduler.pt`` are read with
``weights_only=True``; so are DeepSpeed's shards (``deepspeed_utils.SafeCheckpointEngine``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import UserError
# the layout's names and readers live in rundir; re-exported here for the callers of checkpoint
from ..rundir import (CONFIG, FINAL, MANIFEST, RUN_MARKER, STATE, WEIGHTS, RunDir, RunDirError,  # noqa: F401
                      checkpoints, read_state)


class DiskFullError(UserError, OSError):
    """Not enough free space to write a checkpoint (checked before writing, or ENOSPC while writing)."""

    kind = "disk"


def warn(msg: str) -> None:
    """A fault that was worked around (a skipped broken checkpoint, a dropped torn log line): said, not raised."""
    print(f"[nvembed] WARNING: {msg}", file=sys.stderr, flush=True)


def guard_output_dir(output_dir: str, resume: bool) -> None:
    """Refuse to start a fresh run on top of an existing one."""
    marker = RunDir(output_dir).marker
    if resume:
        if not os.path.isfile(marker):
            raise RunDirError(f"resume=true but {output_dir} holds no nvembed run (no {RUN_MARKER}); "
                              f"start without resume=true")
        return
    if os.path.isfile(marker) or (os.path.isdir(output_dir) and any(
            n in os.listdir(output_dir) for n in ("metrics.jsonl", FINAL, CONFIG))):
        raise RunDirError(f"output_dir {output_dir} already holds a run; pass resume=true to continue it, "
                          f"or choose a new output_dir. Nothing was changed.")


# ---- resume=true against the saved config ---------------------------------------------------------------------------
RESUME_NEUTRAL = ("logging.*", "eval.*", "keep_last", "stage_defs.*.save_every", "max_bad_steps", "export_final",
                  "output_dir", "resume", "resume_changes", "dry_run", "excluded_datasets")
"""Keys that cannot change the weights a resumed run produces (what is logged, evaluated, kept or exported; where the
run lives): they may differ from DIR/config.yaml on resume, and the differences are listed."""
RESUME_OPT_IN = ("stage_defs.*.learning_rate", "stage_defs.*.weight_decay", "stage_defs.*.max_grad_norm")
"""Keys ``resume_changes`` may name: a resume applies their new values from the checkpoint on (the optimizer and
schedule are rebased, see :func:`rebase_schedule`). Anything else differing is refused."""


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if node or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # a path resolved from another working directory (relative here, absolute there) is still the same file
    return (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
            and os.path.samefile(a, b))


def _matches(key: str, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_resume_config(output_dir: str, new: Dict[str, Any], resume_changes: List[str],
                        log: Callable[[str], None] = print) -> List[Tuple[str, Any, Any]]:
    """Compare a resuming run's config (plain, scrubbed) with ``output_dir/config.yaml``; refuse, before anything is
    written, any difference that would change the result unless ``resume_changes`` opts in to it (only keys of
    :data:`RESUME_OPT_IN`). Returns the accepted differences (key, saved, new), which are also logged."""
    from omegaconf import OmegaConf

    from ..config import ConfigError

    bad_opt = [k for k in resume_changes if not _matches(k, RESUME_OPT_IN)]
    if bad_opt:
        raise ConfigError(f"resume_changes names {', '.join(bad_opt)}: a resume can only apply new values of "
                          f"{', '.join(p.replace('*', '<stage>') for p in RESUME_OPT_IN)}")
    path = RunDir(output_dir).config
    if not os.path.isfile(path):
        return []
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    now = _flatten(new)
    diffs = [(k, saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(saved) | set(now))
             if not _same(saved.get(k, "<absent>"), now.get(k, "<absent>"))]
    refused = [d for d in diffs if not _matches(d[0], RESUME_NEUTRAL) and d[0] not in resume_changes]
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {val!r}" for k, old, val in refused)
        raise ConfigError(
            f"resume=true with a config that differs from {path} ({shown}). These keys change the result of the "
            f"resumed run; nothing was written. Resume with the saved values, or start a new output_dir"
            + (f"; a new {', '.join(p.replace('*', '<stage>') for p in RESUME_OPT_IN)} can be applied from the "
               f"checkpoint on with resume_changes=[KEY,...]" if any(_matches(k, RESUME_OPT_IN) for k, _, _ in refused)
               else "") + ".")
    for k, old, val in diffs:
        why = "opted in (resume_changes)" if k in resume_changes else "does not change the result"
        log(f"resume: {k}: {old!r} -> {val!r} ({why})")
    return diffs


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


# ---- manifest: written last, verified on resume --------------------------------------------------------------------
HASH_MAX_BYTES = 256 * 2**20
"""Files up to this size get a sha256 in the manifest; larger ones (optimizer states and DeepSpeed shards of big
models) are checked by size only, so a save does not read gigabytes back. A torn write changes the size."""


def _sha256(path: str) -> Optional[str]:
    if os.path.getsize(path) > HASH_MAX_BYTES:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str) -> None:
    """Record every file of ``folder`` (size, sha256). Written last: its presence means the save finished."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != MANIFEST:
                files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    write_json_atomic(os.path.join(folder, MANIFEST), {"format": 1, "files": files})


def verify(folder: str) -> Optional[str]:
    """What is wrong with a saved folder (``None`` if nothing): missing manifest, a listed file missing, truncated or
    changed. Sizes are compared for every file before any checksum is computed."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (its save never finished)"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        sizes = {rel: int(meta["size"]) for rel, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for rel in (STATE, WEIGHTS):
        if rel not in files:
            return f"{MANIFEST} does not list {rel}"
    for rel, size in sorted(sizes.items()):
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {MANIFEST} says {size} (truncated or rewritten)"
    for rel in sorted(files):
        if files[rel].get("sha256") and _sha256(os.path.join(folder, rel)) != files[rel]["sha256"]:
            return f"{rel} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def find_resume_point(stage_dir: str) -> Optional[str]:
    """The folder a stage resumes from: its ``final`` (the stage is complete) or else its newest complete checkpoint;
    ``None`` when it has neither (the stage starts from its beginning). Broken folders met on the way are named in a
    warning and skipped; a stage that has saved folders but no complete one is a :class:`RunDirError`."""
    broken: List[Tuple[str, str]] = []
    for folder in [os.path.join(stage_dir, FINAL)] + checkpoints(stage_dir)[::-1]:
        if not os.path.isdir(folder):
            continue
        why = verify(folder)
        if why is None:
            for bad, reason in broken:
                warn(f"{bad} is not a complete checkpoint: {reason}; skipped, resuming from {folder}")
            return folder
        broken.append((folder, why))
    if broken:
        detail = "; ".join(f"{bad}: {reason}" for bad, reason in broken)
        raise RunDirError(f"resume=true but no saved state in {stage_dir} is complete ({detail}). Nothing was "
                          f"changed. Move these folders out of {stage_dir} to run the stage from its beginning, or "
                          f"start a new output_dir.")
    return None


# ---- free space ----------------------------------------------------------------------------------------------------
def free_bytes(path: str) -> int:
    """Free space of the file system holding ``path`` (the probe the pre-save check uses)."""
    return shutil.disk_usage(path).free


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def estimate_bytes(weights: Dict[str, torch.Tensor], optimizer=None, extra: int = 0) -> int:
    """Bytes a checkpoint will take: the weights, the optimizer state (AdamW: two moments per weight if not yet
    created), ``extra`` (e.g. DeepSpeed's module shards) and 1 MiB for the small files."""
    w = sum(t.numel() * t.element_size() for t in weights.values())
    opt = 0
    if optimizer is not None:
        opt = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v)) or 2 * w
    return w + opt + extra + 2**20


def check_free_space(parent: str, folder: str, need: int) -> None:
    """Refuse to start a save that cannot fit: nothing is written and the older checkpoints stay as they are."""
    free = free_bytes(parent)
    if free < need:
        raise DiskFullError(f"no space left on device to save {folder}: it needs about {_mb(need)}, {parent} has "
                            f"{_mb(free)} free. Nothing was written; older checkpoints are intact. Free some space "
                            f"(or set keep_last lower), then resume=true")


def _is_enospc(e: BaseException) -> bool:
    # torch.save (PytorchStreamWriter) and safetensors report a full disk without errno: match their text too
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        s in str(e) for s in ("No space left on device", "os error 28", "code: 28", "file write failed"))


def discard_on_error(tmp: str, folder: str, need: int):
    """Context for writing ``tmp``: on any error the temporary folder is removed; a full disk becomes a
    :class:`DiskFullError` naming the checkpoint and the space it needed."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            parent = os.path.dirname(tmp)
            if isinstance(e, Exception) and (_is_enospc(e) or free_bytes(parent) < 2**20):
                raise DiskFullError(f"no space left on device while saving {folder}: it needs about {_mb(need)}, "
                                    f"{parent} has {_mb(free_bytes(parent))} free now that the partial save "
                                    f"({tmp}) is removed. Older checkpoints are intact. Free some space (or set "
                                    f"keep_last lower), then resume=true ({type(e).__name__}: {e})") from e
            raise

    return ctx()


def save_checkpoint(folder: str, *, embedder, optimizer, scheduler, state: Dict[str, Any],
                    accelerator=None, weights: Optional[Dict[str, torch.Tensor]] = None,
                    rng_states: Optional[List[Dict[str, Any]]] = None) -> str:
    """Write a complete checkpoint atomically (manifest last); the trainer prunes (:func:`prune`) once it has proved
    good. ``rng_states``: every rank's :func:`rng_state` (default: this process's only)."""
    parent = os.path.dirname(folder.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(folder)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    weights = weights if weights is not None else embedder.trainable_state_dict()
    need = estimate_bytes(weights, optimizer)
    check_free_space(parent, folder, need)
    with discard_on_error(tmp, folder, need):
        os.makedirs(tmp)
        embedder.save_weights(tmp, weights)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        if scheduler is not None:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "rng.json"), "w") as f:
            json.dump(rng_states or [rng_state()], f)
        write_json_atomic(os.path.join(tmp, STATE), dict(state, saved_at=time.time()))
        write_manifest(tmp)  # last: its presence means "complete"
    publish(tmp, folder)
    return folder


def publish(tmp: str, folder: str) -> None:
    """Move a complete temporary checkpoint into place (replacing an older one of the same name)."""
    if os.path.exists(folder):
        old = f"{tmp}.old"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def prune(stage_dir: str, keep_last: int, upto: Optional[str] = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints up to ``upto`` (0 keeps all). Newer ones are left alone:
    they are broken leftovers a resume skipped, to be replaced when the run gets there. The trainer prunes only once
    ``upto`` has proved good (a finite step after it), so diverging weights cannot push good checkpoints out."""
    found = checkpoints(stage_dir)
    if upto is not None and upto in found:
        found = found[:found.index(upto) + 1]
    if keep_last > 0:
        for stale in found[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(folder: str, *, embedder, optimizer=None, scheduler=None, restore_rng: bool = True,
                    rank: int = 0) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (verify it first: :func:`find_resume_point`)."""
    state = read_state(folder)
    if state is None:
        raise RunDirError(f"{folder} is not a complete checkpoint (no {STATE})")
    for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        if obj is not None and not os.path.isfile(os.path.join(folder, name)):
            # resuming with a fresh optimizer would silently change the run
            raise RunDirError(f"{folder} has no {name}: cannot resume exactly from it")
    try:
        embedder.load_weights(folder)
    except Exception as e:  # e.g. a SafetensorError that names no file
        raise RunDirError(f"cannot load the weights of {os.path.join(folder, WEIGHTS)}: {type(e).__name__}: {e}") from e
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location="cpu"))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
    if restore_rng and os.path.isfile(os.path.join(folder, "rng.json")):
        with open(os.path.join(folder, "rng.json")) as f:
            states = json.load(f)
        states = states if isinstance(states, list) else [states]  # older checkpoints: one process's state
        set_rng_state(states[rank % len(states)])  # each rank its own: dropout draws differ between ranks
    return state


def rebase_schedule(optimizer, scheduler, learning_rate: float, weight_decay: float) -> bool:
    """After a resume, make the config's peak learning rate and weight decay the ones in force (the loaded optimizer
    and scheduler hold the saved ones): the schedule keeps its position, scaled to the new peak. Returns whether
    anything changed (only with ``resume_changes``: otherwise the config check refuses a different value)."""
    changed = any(b != learning_rate for b in scheduler.base_lrs) or any(
        g.get("weight_decay") != weight_decay for g in optimizer.param_groups)
    if not changed:
        return False
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["initial_lr"], g["lr"], g["weight_decay"] = learning_rate, lr, weight_decay
    scheduler._last_lr = lrs
    return True


def clean_temporaries(stage_dir: str) -> None:
    """Remove folders left by a save that was interrupted."""
    if os.path.isdir(stage_dir):
        for name in os.listdir(stage_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(stage_dir, name), ignore_errors=True)
