#!/usr/bin/env python
"""Export a trained nvembed model as a self-contained Hugging Face folder (transformers + sentence-transformers).

    python scripts/export.py runs/demo --out exported/demo
    python scripts/export.py runs/demo/stage1/final --out exported/demo-stage1
    python scripts/export.py runs/demo --out exported/demo --push-to-hub me/my-embedder [--public]
    python scripts/export.py runs/demo --out exported/demo --overwrite     # replace an earlier export there

RUN_OR_STAGE_DIR is a run directory (``config.yaml``; the weights of its last finished stage are used, else its newest
checkpoint) or a stage/checkpoint folder (``nvembed_model.json`` + ``model.safetensors``). The model is rebuilt by
``nvembed.rundir.load_trained`` (same seed as training, so a random-init backbone is reproduced) and
``nvembed.export.export_model`` writes DIR. Uploading needs a Hub token
(``HF_TOKEN`` or ``hf auth login``); nothing is uploaded without ``--push-to-hub``.

``--out`` is refused (exit 2, nothing written) when it is or lies inside training weights, a checkpoint or a stage
folder, or is a non-empty folder that is not an nvembed export; an earlier export is replaced only with
``--overwrite``. The export is written to a temporary sibling folder and swapped in when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvembed.errors import cli  # noqa: E402
from nvembed.export import check_export_dir  # noqa: E402
from nvembed.rundir import load_trained as load_embedder  # noqa: E402  (tests and older callers use this name)
from nvembed.rundir import locate  # noqa: E402


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", metavar="RUN_OR_STAGE_DIR")
    ap.add_argument("--out", required=True, help="folder to write the exported model to (new or empty, or an "
                                                  "earlier export with --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier nvembed export in --out")
    ap.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub model repo")
    ap.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    ap.add_argument("--max-seq-length", type=int, help="default token limit of encode (default: 512 or the "
                                                        "longest training length, capped by the backbone)")
    ap.add_argument("--license", help="license id for the model card (e.g. apache-2.0); else the card says the "
                                      "base model's license applies")
    ap.add_argument("--title", help="model card title")
    args = ap.parse_args(argv)

    from nvembed.export import export_model, publish_export, push_to_hub

    check_export_dir(args.out, overwrite=args.overwrite)  # before the model loads: a refusal costs nothing
    locate(args.path)
    embedder, run_cfg = load_embedder(args.path)
    extra: dict[str, Any] = {}
    if args.license:
        extra["license"] = args.license
    if args.title:
        extra["title"] = args.title
    out = publish_export(args.out, lambda tmp: export_model(embedder, tmp, run_cfg, model_card_extra=extra or None,
                                                            max_seq_length=args.max_seq_length,
                                                            repo_id=args.push_to_hub))
    print(f"[export] wrote {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=not args.public)
        print(f"[export] uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
