"""Command-line glue for ``train/train.py``: override checks, path resolution, the Hydra entry point."""

from __future__ import annotations

import os
import sys
from typing import List

from .config import ConfigError, RunConfig, check_key, describe, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hydra should not write its own output folders or reconfigure logging: the run directory is ours
HYDRA_QUIET = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def check_overrides(argv: List[str]) -> None:
    """Fail on a misspelled ``key=value`` override before Hydra or any model loads, naming valid keys."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or "/" in key:
            continue
        check_key(key)


def resolve_path(path: str, root: str = REPO) -> str:
    """A relative path is taken from the working directory if it exists there, else from the repository root."""
    if not path or os.path.isabs(path) or os.path.exists(path) or path.startswith("pkg://"):
        return path
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def finalize(cfg: RunConfig) -> RunConfig:
    m = cfg.model
    for attr in ("tokenizer", "name_or_path"):
        if getattr(m, attr):
            setattr(m, attr, resolve_path(getattr(m, attr)))
    if cfg.init_from:
        cfg.init_from = resolve_path(cfg.init_from)
    return cfg


def run_from_hydra(raw) -> dict:
    from .training.trainer import Trainer

    cfg = finalize(validate(raw))
    return Trainer(cfg, specs_root=os.path.join(REPO, "data_specs")).run()


def train_main(argv: List[str] | None = None) -> None:
    """Entry point: ``python train/train.py --config-name=smoke output_dir=DIR key=value ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-config" in argv:
        print(describe(RunConfig))
        return
    try:
        check_overrides(argv)
    except ConfigError as e:
        print(f"nvembed: config error: {e}", file=sys.stderr)
        sys.exit(2)
    import hydra

    given = {a.split("=", 1)[0] for a in argv if "=" in a}
    extra = [q for q in HYDRA_QUIET if q.split("=", 1)[0] not in given]

    @hydra.main(config_path=os.path.join(REPO, "recipes"), config_name="smoke", version_base=None)
    def _main(raw) -> None:
        try:
            run_from_hydra(raw)
        except ConfigError as e:
            print(f"nvembed: config error: {e}", file=sys.stderr)
            sys.exit(2)

    # `++key=value`: set a schema key whether or not the recipe file mentions it (our own check ran above)
    argv = [f"++{a}" if "=" in a and not a.startswith(("-", "+", "~")) and not a.startswith("hydra")
            and "/" not in a.split("=", 1)[0] else a for a in argv]
    sys.argv = [sys.argv[0]] + argv + extra
    _main()
