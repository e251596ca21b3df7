"""Command-line glue for ``train/train.py`` and the ``nvembed-train`` console script: override checks, path
resolution (what the user typed becomes absolute here; nothing below resolves paths against a root of its own), the
Hydra entry point. Recipes and data specs come from :mod:`nvembed.paths`: the checkout's folders, or the copies a
regular install ships in ``nvembed/_bundled/``."""

from __future__ import annotations

import difflib
import os
import sys
from typing import List, Optional, Tuple

from . import errors, paths
from .config import ConfigError, RunConfig, check_key, describe, validate

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


def finalize(cfg: RunConfig) -> RunConfig:
    """Paths typed relative to the working directory, or to the checkout / installed bundle (``recipes/assets/...``
    in the smoke recipe), made absolute. Data specs stay as written (``config.yaml`` keeps them so, and resume
    compares it): they are looked up under the ``specs_root`` passed to the trainer."""
    m = cfg.model
    for attr in ("tokenizer", "name_or_path"):
        if getattr(m, attr):
            setattr(m, attr, paths.resolve_path(getattr(m, attr)))
    if cfg.init_from:
        cfg.init_from = paths.resolve_path(cfg.init_from)
    cfg.eval.suites = [paths.resolve_path(s, [paths.eval_suites_root()]) for s in cfg.eval.suites]
    return cfg


def run_from_hydra(raw) -> dict:
    cfg = finalize(validate(raw))
    specs_root = paths.specs_root()
    if cfg.dry_run:
        from .preflight import dry_run

        dry_run(cfg, specs_root)
        return {}
    from .training.trainer import Trainer

    return Trainer(cfg, specs_root=specs_root).run()


# Hydra's own options (``hydra/_internal/utils.py:get_args_parser``); those in _TAKES_VALUE are followed by a value
# (``--config-name smoke`` or ``--config-name=smoke``), --info by an optional one
_TAKES_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
                "--package", "-p", "--cfg", "-c"}
_INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_OPTIONS = _TAKES_VALUE | {"--info", "-i", "--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r",
                           "--multirun", "-m", "--shell-completion", "-sc"}


def split_argv(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(options with their values, ``key=value`` overrides), whatever order they were typed in: Hydra's parser
    wants its options before the overrides, and we append overrides of our own."""
    options: List[str] = []
    overrides: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name = arg.split("=", 1)[0]
        if name not in _OPTIONS:
            close = difflib.get_close_matches(name, sorted(_OPTIONS | {"--help-config"}), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown option '{arg}'.{hint} Options: --config-name=RECIPE, --config-dir=DIR, "
                              f"--help-config, --cfg=job; config keys are set as key=value")
        options.append(arg)
        if "=" in arg:
            continue
        if name in _TAKES_VALUE:
            if i == len(argv) or argv[i].startswith("-"):
                raise ConfigError(f"Option '{arg}' needs a value (e.g. {name}=smoke)")
            options.append(argv[i])
            i += 1
        elif name in ("--info", "-i") and i < len(argv) and argv[i] in _INFO:
            options.append(argv[i])
            i += 1
    return options, overrides


def _option(options: List[str], *names: str) -> Optional[str]:
    value = None
    for i, arg in enumerate(options):
        key, eq, val = arg.partition("=")
        if key in names:
            value = val if eq else (options[i + 1] if i + 1 < len(options) else None)
    return value


def check_recipe(options: List[str]) -> None:
    """A ``--config-name`` that names no recipe fails here, listing the recipes, instead of in Hydra."""
    name = _option(options, "--config-name", "-cn")
    if name is None or _option(options, "--config-path", "-cp") is not None:
        return
    dirs = [paths.recipes_root()] + [d for d in [_option(options, "--config-dir", "-cd")] if d]
    file = name if name.endswith(".yaml") else f"{name}.yaml"
    if any(os.path.isfile(os.path.join(d, file)) for d in dirs):
        return
    have = sorted(f[:-5] for d in dirs if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".yaml"))
    raise ConfigError(f"No recipe '{name}' (looked for {file} in {', '.join(dirs)}); recipes: {', '.join(have)}")


def check_syntax(overrides: List[str]) -> None:
    """Hydra's override grammar, checked one override at a time so that the message names the one at fault."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        if "=" not in arg and not arg.startswith("~"):
            raise ConfigError(f"'{arg}' is not a key=value override (a recipe is chosen with --config-name={arg})")
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as e:
            why = str(e).splitlines()[0]
            raise ConfigError(f"Cannot parse override '{arg}': {why} (quote values with spaces or brackets; "
                              f"grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)") from None


@errors.cli
def train_main(argv: List[str] | None = None) -> int:
    """Entry point: ``python train/train.py --config-name=smoke output_dir=DIR key=value ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-config" in argv:
        print(describe(RunConfig))
        return 0
    options, overrides = split_argv(argv)
    check_overrides(overrides)
    check_recipe(options)
    check_syntax(overrides)
    import hydra

    given = {a.split("=", 1)[0] for a in overrides}
    extra = [q for q in HYDRA_QUIET if q.split("=", 1)[0] not in given]
    from .sweep import for_job, hydra_args, is_sweep  # -m: one run per combination, a table over them

    if is_sweep(options):
        extra += hydra_args(overrides)
    failed: List[errors.UserError] = []

    @hydra.main(config_path=paths.recipes_root(), config_name="smoke", version_base=None)
    def _main(raw) -> None:
        try:
            run_from_hydra(for_job(raw))
        except errors.UserError as e:  # raised below, outside Hydra, which would print it with a traceback
            failed.append(e)

    # `++key=value`: set a schema key whether or not the recipe file mentions it (our own check ran above)
    overrides = [f"++{a}" if "=" in a and not a.startswith(("+", "~")) and not a.startswith("hydra")
                 and "/" not in a.split("=", 1)[0] else a for a in overrides]
    saved = sys.argv
    sys.argv = [saved[0]] + options + overrides + extra
    try:
        _main()
    finally:
        sys.argv = saved
    if failed:
        raise failed[0]
    return 0


_CHECK_RECIPE_USAGE = """Check a recipe without loading a model: its config, every stage's data specs and local
sources (rows counted), the eval suites and the run folder. One row per dataset; exit 0 when all is fine, 2 otherwise.

    nvembed-check-recipe nvembed_v2                     (python scripts/check_recipe.py ... in a checkout)
    nvembed-check-recipe smoke stage_defs.stage1.batch_size=64
    nvembed-check-recipe path/to/my_recipe.yaml

The same as ``nvembed-train --config-name=RECIPE dry_run=true``."""


def check_recipe_main(argv: List[str] | None = None) -> int:
    """Entry point of ``nvembed-check-recipe`` and ``scripts/check_recipe.py``: RECIPE (a name or a YAML file
    anywhere) then ``key=value`` overrides; a dry run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(_CHECK_RECIPE_USAGE, file=sys.stderr)
        return 2
    recipe, rest = argv[0], argv[1:]
    where = []
    if recipe.endswith(".yaml"):  # a file anywhere: Hydra finds it through an extra search directory
        where = [f"--config-dir={os.path.dirname(os.path.abspath(recipe))}"]
        recipe = os.path.basename(recipe)[:-len(".yaml")]
    return train_main([f"--config-name={recipe}", *where, *rest, "dry_run=true"])


if __name__ == "__main__":  # python -m nvembed.cli --config-name=smoke ...: the same as nvembed-train
    sys.exit(train_main())
