#!/usr/bin/env python
"""Export a trained nvembed model as a self-contained Hugging Face folder (transformers + sentence-transformers).

    python scripts/export.py runs/demo --out exported/demo
    python scripts/export.py runs/demo/stage1/final --out exported/demo-stage1
    python scripts/export.py runs/demo --out exported/demo --push-to-hub me/my-embedder [--public]
    python scripts/export.py runs/demo --out exported/demo --overwrite     # replace an earlier export there

RUN_OR_STAGE_DIR is a run directory (``config.yaml``; the weights of its last finished stage are used, else its newest
checkpoint) or a stage/checkpoint folder (``nvembed_model.json`` + ``model.safetensors``). The model is rebuilt with
``nvembed.model.build_embedder`` (same seed as training, so a random-init backbone is reproduced), the weights are
loaded with ``Embedder.load_weights``, and ``nvembed.export.export_model`` writes DIR. Uploading needs a Hub token
(``HF_TOKEN`` or ``hf auth login``); nothing is uploaded without ``--push-to-hub``.

``--out`` is refused (exit 2, nothing written) when it is or lies inside training weights, a checkpoint or a stage
folder, or is a non-empty folder that is not an nvembed export; an earlier export is replaced only with
``--overwrite``. The export is written to a temporary sibling folder and swapped in when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nvembed.errors import cli  # noqa: E402
from nvembed.export import ExportError, check_export_dir, is_export  # noqa: E402

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "nvembed_model.json"


def _resolve(path: Optional[str], roots) -> Optional[str]:
    """A relative path as the trainer saw it: from the working directory, the run's parent, or the repo root."""
    if not path or os.path.isabs(path) or path.startswith("pkg://") or os.path.exists(path):
        return path
    for root in roots:
        candidate = os.path.join(str(root), path)
        if os.path.exists(candidate):
            return candidate
    return path


def _is_weights_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, MODEL_CONFIG))


def _checkpoint_step(name: str) -> int:
    m = re.match(r"^checkpoint-(\d+)$", name)
    return int(m.group(1)) if m else -1


def find_weights(run_dir: str, stages) -> str:
    """The last stage's ``final`` folder, else the newest checkpoint of the latest stage that has one."""
    for name in reversed(list(stages)):
        stage_dir = os.path.join(run_dir, name)
        if _is_weights_folder(os.path.join(stage_dir, "final")):
            return os.path.join(stage_dir, "final")
        if os.path.isdir(stage_dir):
            ckpts = sorted((c for c in os.listdir(stage_dir) if _checkpoint_step(c) >= 0
                            and _is_weights_folder(os.path.join(stage_dir, c))), key=_checkpoint_step)
            if ckpts:
                return os.path.join(stage_dir, ckpts[-1])
    raise ExportError(f"{run_dir}: no stage weights found (looked for <stage>/final and <stage>/checkpoint-N "
                            f"for stages {list(stages)})")


def load_run_config(run_dir: str):
    from omegaconf import OmegaConf

    from nvembed.config import validate

    return validate(OmegaConf.load(os.path.join(run_dir, "config.yaml")))


def locate(path: str) -> Tuple[str, Optional[str]]:
    """(weights folder, run dir or None) for a run directory or a stage/checkpoint folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such folder (expected a run directory or a stage/checkpoint folder)")
    if is_export(path) and not _is_weights_folder(path):
        raise ExportError(f"{path} is already an exported model; pass the run or stage folder instead")
    if _is_weights_folder(path):
        for up in (Path(path).parent, Path(path).parent.parent):  # RUN/<stage>/final, RUN/<stage>/checkpoint-N
            if (up / "config.yaml").is_file():
                return path, str(up)
        return path, None
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return find_weights(path, load_run_config(path).stages), path
    raise ExportError(f"{path}: neither a run directory (config.yaml) nor a stage/checkpoint folder "
                            f"({MODEL_CONFIG} + {WEIGHTS})")


def load_embedder(path: str):
    """Rebuild the trained Embedder from a run or stage folder. Returns (embedder, run config or None)."""
    from nvembed.config import model_from_dict
    from nvembed.model import build_embedder

    weights, run_dir = locate(path)
    run_cfg = load_run_config(run_dir) if run_dir else None
    with open(os.path.join(weights, MODEL_CONFIG)) as f:  # unscrubbed, unlike config.yaml
        model_cfg = model_from_dict(json.load(f))
    model_cfg.compile = False  # a training speed setting: export runs a handful of forwards, compiling costs a minute
    roots = [os.getcwd(), REPO] + ([Path(run_dir).parent] if run_dir else [])
    model_cfg.tokenizer = _resolve(model_cfg.tokenizer, roots)
    model_cfg.name_or_path = _resolve(model_cfg.name_or_path, roots)
    if model_cfg.gguf_file and not model_cfg.name_or_path:
        model_cfg.gguf_file = _resolve(model_cfg.gguf_file, roots)
    if run_cfg is not None:
        run_cfg.model = model_cfg
    seed = run_cfg.seed if run_cfg is not None else 42
    if run_cfg is None and model_cfg.random_init is not None:
        print(f"[export] warning: no config.yaml above {weights}; rebuilding the random backbone with seed {seed}",
              file=sys.stderr)
    embedder = build_embedder(model_cfg, seed=seed)
    embedder.load_weights(weights)
    embedder.eval()
    return embedder, run_cfg


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
