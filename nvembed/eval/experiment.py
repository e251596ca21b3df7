"""What the experiment tools (``scripts/ablate.py``, ``scripts/peer_compare.py``) share: reading a recipe with the
user's overrides, launching one Hydra sweep of ``train/train.py`` over seeds, evaluating a run's export on a suite
(cached), and mean ± spread over seeds."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError

TYPES = ("retrieval", "sts", "classification", "clustering")
"""Task types of an evaluation suite, in table order (``average`` keys besides ``all``)."""


class ExperimentError(UserError, ValueError):
    """An experiment cannot run as asked (bad seeds, recipe, suite or override; a training that failed); the message
    names the argument or the run folder."""

    kind = "experiment"


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_seeds(seeds: Sequence[int]) -> None:
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds: give distinct seeds, got {list(seeds)}")


def check_extra(extra: Sequence[str]) -> None:
    """``--set`` values change every run: one value per known key (a comma list would be a sweep the tool cannot
    name; seeds, folder and resume are the tool's own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from ..config import check_key

    for e in extra:
        check_key(e.split("=", 1)[0].lstrip("+~"))  # a misspelled key fails here, not in the training process
        try:
            (o,) = OverridesParser.create().parse_overrides([e])
        except (OverrideParseException, ValueError) as err:
            raise ExperimentError(f"--set {e!r}: not a key=value override ({str(err).splitlines()[0]})") from None
        if o.is_sweep_override() or o.key_or_group in ("seed", "output_dir", "resume"):
            raise ExperimentError(f"--set {e!r}: give one value per key (seeds go in --seeds, the folder in --out)")


def load_recipe(recipe: str, extra: Sequence[str]) -> Dict[str, Any]:
    """The recipe YAML with the user's extra ``key=value`` overrides applied, as a plain dict."""
    from omegaconf import OmegaConf

    from ..paths import recipes_root

    path = os.path.join(recipes_root(), recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    if not os.path.isfile(path):
        have = sorted(f[:-5] for f in os.listdir(recipes_root()) if f.endswith(".yaml"))
        raise ExperimentError(f"--recipe: no recipe {path}; recipes: {', '.join(have)}")
    cfg = OmegaConf.load(path)
    dotlist = [e.lstrip("+") for e in extra if "=" in e and not e.startswith("~")]
    return OmegaConf.to_container(OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist)), resolve=True)


def resolve_suite(recipe: Dict[str, Any], suite: Optional[str]) -> str:
    """``suite`` as typed (absolute, from the working directory or under ``data_specs/eval``), else the recipe's
    first eval suite resolved as the trainer does."""
    from ..paths import eval_suites_root, resolve_path

    if suite is None:
        suite = ((recipe.get("eval") or {}).get("suites") or ["demo.yaml"])[0]
    return os.path.abspath(resolve_path(suite, [eval_suites_root()]))


def quote(value: str) -> str:
    """A Hydra override value taken literally (a folder may hold ``=`` or ``,``)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sweep_command(recipe: str, sweep_dir: str, seeds: Sequence[int], overrides: Sequence[str], resume: bool) -> List[str]:
    """One ``train/train.py -m`` process over the seeds (and any comma list in ``overrides``): one interpreter start,
    not one per run. Hydra names each run from the swept keys (``seed=S``; ``choice(...)`` keeps a single seed a
    sweep, named the same way). Evaluation is left to the tool (on the export), so it is off during training."""
    from ..paths import SOURCE_ROOT

    cmd = [sys.executable, os.path.join(SOURCE_ROOT, "train", "train.py"), "-m", f"--config-name={recipe}",
           f"output_dir={quote(sweep_dir)}", "seed=choice(" + ",".join(str(s) for s in seeds) + ")",
           "eval.enabled=false", "export_final=true", *overrides]
    return cmd + (["resume=true"] if resume else [])


def evaluate_export(model_dir: str, suite: str, cache: str, max_length: int,
                    log: Callable[[str], None]) -> Dict[str, Any]:
    """Suite result of a model folder through :func:`nvembed.eval.encoders.load_encoder` (instructions on, the
    recipe's evaluation length, as the trainer evaluates), cached in ``cache`` while it is newer than the model and
    was made with the same suite."""
    stamp = os.path.getmtime(os.path.join(model_dir, "config.json"))
    res = read_json(cache)
    if res is not None and res.get("suite_path") == suite and os.path.getmtime(cache) >= stamp:
        return res
    from .encoders import load_encoder
    from .suite import run_suite

    log(f"[nvembed] evaluating {model_dir}")
    res = run_suite(load_encoder(model_dir, use_instructions=True, max_seq_length=max_length), suite)
    res["suite_path"] = suite
    write_json(cache, res)
    return res


def mean_std(vals: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for one value; None for none)."""
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)


def cell(ms: Tuple[Optional[float], Optional[float]], sign: bool = False) -> str:
    """``mean ± std`` for a table (``-`` when there is no value)."""
    m, sd = ms
    return "-" if m is None else (f"{m:+.2f} ± {sd:.2f}" if sign else f"{m:.2f} ± {sd:.2f}")


def add_arguments(ap, out_help: str, set_help: str) -> None:
    """The command-line options every experiment tool takes: recipe, output folder, seeds, suite, ``--set``."""
    ap.add_argument("--recipe", default="demo", help="recipe name (recipes/NAME.yaml)")
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--suite", help="evaluation suite YAML (default: the recipe's first eval suite)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help=set_help)


def report(paths: Dict[str, str]) -> int:
    """Print the table (stdout) and the files written (stderr)."""
    with open(paths["md"]) as f:
        print(f.read())
    print(" ".join(paths.values()), file=sys.stderr)
    return 0
