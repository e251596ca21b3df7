"""Check a recipe without loading a model: its config, every stage's data specs and local sources (rows counted),
the eval suites and the run folder. Prints one row per dataset; exit 0 when all is fine, 2 otherwise.

    python scripts/check_recipe.py nvembed_v2
    python scripts/check_recipe.py smoke stage_defs.stage1.batch_size=64
    python scripts/check_recipe.py path/to/my_recipe.yaml

The same as ``python train/train.py --config-name=RECIPE dry_run=true``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from nvembed.cli import train_main  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    recipe, rest = argv[0], argv[1:]
    where = []
    if recipe.endswith(".yaml"):  # a file anywhere: Hydra finds it through an extra search directory
        where = [f"--config-dir={os.path.dirname(os.path.abspath(recipe))}"]
        recipe = os.path.basename(recipe)[:-len(".yaml")]
    return train_main([f"--config-name={recipe}", *where, *rest, "dry_run=true"])


if __name__ == "__main__":
    sys.exit(main())
