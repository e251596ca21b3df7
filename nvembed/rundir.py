"""The run folder: one place that knows its layout (trainer, checkpoints, evaluation and export all ask here).

Layout::

    RUN/run.json                      marks the folder as an nvembed run (a fresh run refuses to overwrite it)
    RUN/config.yaml                   the validated config (secrets scrubbed)
    RUN/<stage>/checkpoint-<step>/    model.safetensors + nvembed_model.json, optimizer/scheduler/RNG, state.json,
                                      manifest.json (written last)
    RUN/<stage>/final/                the stage's weights, state.json (complete: true), manifest.json
    RUN/final/                        the exported model (transformers + sentence-transformers)
    RUN/eval/<label>.json             evaluation results, results.{json,md,png}

Bottom floor: imports nothing from ``nvembed.training`` (the model and config are imported inside the functions that
rebuild a trained model).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

from .errors import UserError

WEIGHTS = "model.safetensors"
"""Trainable weights of a stage/checkpoint folder (``Embedder.save_weights`` writes it)."""
MODEL_CONFIG = "nvembed_model.json"
"""The model config saved next to them (unscrubbed, unlike config.yaml)."""
STATE = "state.json"
MANIFEST = "manifest.json"
RUN_MARKER = "run.json"
CONFIG = "config.yaml"
FINAL = "final"
EVAL = "eval"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(UserError, RuntimeError):
    """The output folder cannot be used as asked (it holds another run, or no run to resume)."""

    kind = "run folder"


def checkpoint_step(name: str) -> int:
    """N of a ``checkpoint-N`` folder name; -1 for any other name."""
    m = _CKPT.match(name)
    return int(m.group(1)) if m else -1


def checkpoints(stage_dir: str) -> List[str]:
    """Every ``checkpoint-N`` folder of a stage, oldest first, complete or not (``checkpoint.verify`` tells)."""
    if not os.path.isdir(stage_dir):
        return []
    found = [(checkpoint_step(n), os.path.join(stage_dir, n)) for n in os.listdir(stage_dir)]
    return [p for step, p in sorted(found) if step >= 0 and os.path.isdir(p)]


def read_state(folder: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, STATE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_weights_folder(path: str) -> bool:
    """A stage ``final`` or ``checkpoint-N`` folder: trainable weights and the model config."""
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, MODEL_CONFIG))


class RunDir:
    """Paths inside one run folder. Creates nothing: the callers write (atomically, see ``training.checkpoint``)."""

    def __init__(self, root: str):
        self.root = root

    @property
    def config(self) -> str:
        return os.path.join(self.root, CONFIG)

    @property
    def marker(self) -> str:
        return os.path.join(self.root, RUN_MARKER)

    @property
    def final(self) -> str:
        """The exported model of the whole run."""
        return os.path.join(self.root, FINAL)

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.root, EVAL)

    def eval_file(self, label: str) -> str:
        return os.path.join(self.root, EVAL, f"{label}.json")

    def stage(self, name: str) -> str:
        return os.path.join(self.root, name)

    def stage_final(self, name: str) -> str:
        return os.path.join(self.root, name, FINAL)

    def checkpoint(self, name: str, step: int) -> str:
        return os.path.join(self.root, name, f"checkpoint-{step}")

    def checkpoints(self, name: str) -> List[str]:
        return checkpoints(self.stage(name))

    def is_run(self) -> bool:
        return os.path.isfile(self.marker)

    def latest_weights(self, stages) -> str:
        """The last stage's ``final`` folder, else the newest checkpoint of the latest stage that has one (for
        export: weights only, so the manifest is not required)."""
        from .export import ExportError

        for name in reversed(list(stages)):
            if is_weights_folder(self.stage_final(name)):
                return self.stage_final(name)
            found = [c for c in self.checkpoints(name) if is_weights_folder(c)]
            if found:
                return found[-1]
        raise ExportError(f"{self.root}: no stage weights found (looked for <stage>/final and <stage>/checkpoint-N "
                          f"for stages {list(stages)})")

    def load_config(self):
        """The run's validated ``RunConfig`` (from config.yaml)."""
        from omegaconf import OmegaConf

        from .config import validate

        return validate(OmegaConf.load(self.config))


def locate(path: str) -> Tuple[str, Optional[str]]:
    """(weights folder, run folder or None) for a run folder or a stage/checkpoint folder."""
    from .export import ExportError, is_export

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such folder (expected a run directory or a stage/checkpoint folder)")
    if is_export(path) and not is_weights_folder(path):
        raise ExportError(f"{path} is already an exported model; pass the run or stage folder instead")
    if is_weights_folder(path):
        parent = os.path.dirname(path)
        for up in (parent, os.path.dirname(parent)):  # RUN/<stage>/final, RUN/<stage>/checkpoint-N
            if os.path.isfile(os.path.join(up, CONFIG)):
                return path, up
        return path, None
    if os.path.isfile(os.path.join(path, CONFIG)):
        run = RunDir(path)
        return run.latest_weights(run.load_config().stages), path
    raise ExportError(f"{path}: neither a run directory ({CONFIG}) nor a stage/checkpoint folder "
                      f"({MODEL_CONFIG} + {WEIGHTS})")


def load_trained(path: str):
    """Rebuild the trained Embedder of a run or stage/checkpoint folder (the training seed reproduces a random-init
    backbone; relative model paths are found as the trainer saw them). Returns (embedder in eval mode, run config or
    None)."""
    from .config import model_from_dict
    from .model import build_embedder
    from .paths import resolve_path

    weights, run_dir = locate(path)
    run_cfg = RunDir(run_dir).load_config() if run_dir else None
    with open(os.path.join(weights, MODEL_CONFIG)) as f:
        model_cfg = model_from_dict(json.load(f))
    model_cfg.compile = False  # a training speed setting: a handful of forwards here, compiling costs a minute
    roots = [os.path.dirname(run_dir)] if run_dir else []  # resolve_path tries the checkout/bundle last
    model_cfg.tokenizer = resolve_path(model_cfg.tokenizer, roots)
    model_cfg.name_or_path = resolve_path(model_cfg.name_or_path, roots)
    if model_cfg.gguf_file and not model_cfg.name_or_path:
        model_cfg.gguf_file = resolve_path(model_cfg.gguf_file, roots)
    if run_cfg is not None:
        run_cfg.model = model_cfg
    seed = run_cfg.seed if run_cfg is not None else 42
    if run_cfg is None and model_cfg.random_init is not None:
        print(f"[nvembed] warning: no {CONFIG} above {weights}; rebuilding the random backbone with seed {seed}",
              file=sys.stderr)
    embedder = build_embedder(model_cfg, seed=seed)
    embedder.load_weights(weights)
    embedder.eval()
    return embedder, run_cfg
