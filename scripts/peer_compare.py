#!/usr/bin/env python
"""Quality per compute against the sentence-transformers peer: a recipe's nvembed run and a plain
sentence-transformers run (causal attention, mean pooling, MNRL, the same LoRA, backbone, layers, stage-1 batches,
batch size and learning rate) trained for the same wall-clock seconds on this machine, both evaluated on the same
suite, for each seed; then mean ± sample std over seeds of both and of the difference.

    python scripts/peer_compare.py --recipe demo --out runs/peer --seeds 1 2 3
    python scripts/peer_compare.py --recipe demo --out runs/peer_small --set stage_defs.stage1.max_steps=20

Writes ``OUT/peer.md`` and ``OUT/peer.json``; ``OUT/nvembed/seed=S`` are the nvembed runs, ``OUT/peer/seed=S/model``
the peers. Re-running the same command continues (finished runs and evaluations are kept). How the peer is built and
timed: ``nvembed/eval/peer.py``.
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
    add_arguments(ap, "folder of the comparison",
                  "overrides for the nvembed runs (the peer follows them: model, stage-1 data, batch size, learning "
                  "rate), e.g. a smaller scale: stage_defs.stage1.max_steps=20")
    a = ap.parse_args(argv)
    from nvembed.eval.peer import run

    paths = run(a.recipe, a.out, seeds=a.seeds, suite=a.suite, extra=a.set,
                log=lambda m: print(m, file=sys.stderr, flush=True))
    return report(paths)


if __name__ == "__main__":
    sys.exit(main())
