"""Hydra entry point.

    python train/train.py --config-name=smoke output_dir=/tmp/x
    accelerate launch train/train.py --config-name=demo output_dir=runs/demo stage_defs.stage1.max_steps=10
    python train/train.py --help-config      # every config key with its docstring

From a regular install (no checkout), the console script ``nvembed-train`` takes the same arguments, in any folder.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from nvembed.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
