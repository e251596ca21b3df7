"""Check a recipe without loading a model: its config, every stage's data specs and local sources (rows counted),
the eval suites and the run folder. Prints one row per dataset; exit 0 when all is fine, 2 otherwise.

    python scripts/check_recipe.py nvembed_v2
    python scripts/check_recipe.py smoke stage_defs.stage1.batch_size=64
    python scripts/check_recipe.py path/to/my_recipe.yaml

The same as ``python train/train.py --config-name=RECIPE dry_run=true``; installed: ``nvembed-check-recipe``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from nvembed.cli import check_recipe_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
