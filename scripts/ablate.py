#!/usr/bin/env python
"""Ablate the NV-Embed choices on a recipe: pooling x attention, stage-2 in-batch negatives, one stage vs two, the
latent head's zero-initialised residuals; several seeds each, every run's export evaluated on a held-out suite.

    python scripts/ablate.py --recipe demo --out runs/ablations --seeds 1 2 3
    python scripts/ablate.py --recipe demo --out runs/ablations --groups pooling_attention --set model.num_layers=4
    python scripts/ablate.py --out runs/ablations --no-train     # only evaluate and tabulate what is there

Writes ``OUT/ablations.md`` (mean ± std over seeds per setting, Δ vs the recipe as written), ``.json`` and ``.png``.
Re-running the same command continues where it stopped. See docs/ablations.md for a measured table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from nvembed import errors  # noqa: E402


@errors.cli
def main(argv=None) -> int:
    from nvembed.eval.experiment import add_arguments, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "folder of the ablation (one sweep folder per group inside)",
                  "overrides for every run (e.g. a smaller scale: stage_defs.stage1.max_steps=20)")
    ap.add_argument("--groups", nargs="+", help="only these groups (pooling_attention, stage2_in_batch, one_stage, "
                                                "single_stage, zero_init_residual)")
    ap.add_argument("--no-train", action="store_true", help="evaluate and tabulate the runs already there")
    a = ap.parse_args(argv)
    from nvembed.eval.ablate import run

    paths = run(a.recipe, a.out, seeds=a.seeds, only=a.groups, suite=a.suite, extra=a.set, train=not a.no_train,
                log=lambda m: print(m, file=sys.stderr, flush=True))
    return report(paths)


if __name__ == "__main__":
    sys.exit(main())
