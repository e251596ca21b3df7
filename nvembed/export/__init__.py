"""Export a trained Embedder as a self-contained Hugging Face model folder.

    from nvembed.export import export_model
    export_model(embedder, "runs/x/final", run_cfg)

The folder (merged weights in safetensors, tokenizer, remote code, model card, scrubbed run config) loads without
nvembed, with either ``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)`` (``.encode(texts,
instruction=...)``) or ``sentence_transformers.SentenceTransformer(DIR, trust_remote_code=True)``
(``.encode(texts, prompt="Instruct: ...\\nQuery: ")``). See :mod:`nvembed.export.hf`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional, Union

from ..errors import UserError
from ..rundir import CONFIG, FINAL, MODEL_CONFIG, WEIGHTS, checkpoint_step

__all__ = ["export_model", "push_to_hub", "check_no_secrets", "ExportError", "check_export_dir", "is_export",
           "publish_export"]

# the files that make a folder training weights (a stage's ``final`` or a ``checkpoint-N``): never an export target
_WEIGHTS_FILES = (WEIGHTS, MODEL_CONFIG)


class ExportError(UserError, ValueError):
    """The export source or target folder cannot be used as asked (e.g. it would overwrite training weights)."""

    kind = "export"


# the ``auto_map`` an nvembed export's config.json carries (NV-Embed-v1/v2 carry the same one; see is_export)
AUTO_MAP = {"AutoConfig": "configuration_nvembed.NVEmbedConfig", "AutoModel": "modeling_nvembed.NVEmbedModel"}


def is_export(folder) -> bool:
    """``folder`` holds a model exported by nvembed: its ``config.json`` has ``model_type: nvembed``, nvembed's
    ``auto_map`` (or none) and no ``latent_attention_config``. A published NV-Embed-v1/v2 checkpoint (or a folder in
    its layout, see :func:`nvembed.model.nvembed_layout.is_nvembed_checkpoint`) shares the model type and auto_map
    but has that key, so it is never taken for an export (nor loaded or overwritten as one)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and cfg.get("model_type") == "nvembed" and "latent_attention_config" not in cfg
            and cfg.get("auto_map", AUTO_MAP) == AUTO_MAP)


def _training_folder(path: str) -> Optional[str]:
    """Why ``path`` belongs to training (weights, checkpoint or stage folder), or None."""
    if all(os.path.isfile(os.path.join(path, f)) for f in _WEIGHTS_FILES):
        return "training weights"
    if checkpoint_step(os.path.basename(path)) >= 0:
        return "a training checkpoint folder"
    parent = os.path.dirname(path)
    if os.path.isfile(os.path.join(parent, CONFIG)) and os.path.isdir(path) and any(
            (n == FINAL or checkpoint_step(n) >= 0) and os.path.isdir(os.path.join(path, n))
            for n in os.listdir(path)):
        return "a training stage folder"
    return None


def check_export_dir(folder: str, *, overwrite: bool = True) -> None:
    """Refuse an export target that would destroy anything but an earlier export.

    Refused: ``folder`` equal to or inside training weights, a checkpoint or a stage folder of a run; an existing
    file; an existing non-empty folder that is not an nvembed export; and, with ``overwrite=False``, an existing
    export. Raises :class:`ExportError` before anything is written."""
    path = os.path.realpath(folder)
    probe = path
    while True:
        why = _training_folder(probe) if os.path.isdir(probe) else None
        if why:
            where = "is" if probe == path else f"is inside {probe}, which is"
            raise ExportError(f"--out {folder} {where} {why}; exporting there would overwrite what training "
                              f"wrote: choose a new or empty folder (e.g. RUN/exported)")
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"--out {folder} is an existing file, not a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not is_export(path):
            raise ExportError(f"--out {folder} is a non-empty folder that is not an nvembed export "
                              f"({len(os.listdir(path))} entries); choose a new or empty folder")
        if not overwrite:
            raise ExportError(f"--out {folder} already holds an exported model; pass --overwrite to replace it "
                              f"or choose a new folder")


def publish_export(folder: str, write) -> str:
    """Run ``write(tmp)`` into a fresh sibling folder, then swap it in for ``folder``: an export that fails leaves
    ``folder`` as it was (no half-written mix of old and new files)."""
    folder = os.path.abspath(folder)
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    os.makedirs(parent, exist_ok=True)
    tmp, old = os.path.join(parent, f".{name}.tmp-{os.getpid()}"), os.path.join(parent, f".{name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _versions() -> Dict[str, str]:
    out = {}
    for name in ("nvembed", "transformers", "sentence_transformers", "torch", "peft"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:
            pass
    return out


def check_no_secrets(folder: str) -> None:
    """Raise if a secret environment value (HF_TOKEN, WANDB_API_KEY, ...) appears in a written text file."""
    from .model_card import env_secret_values

    secrets = env_secret_values()
    if not secrets:
        return
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith((".json", ".md", ".py", ".txt", ".yaml", ".jinja", ".model")):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            for s in secrets:
                if s.encode() in data:
                    os.remove(path)
                    raise RuntimeError(f"export: {path} contained the value of a secret environment variable; "
                                       f"the file was deleted")


def export_model(embedder, folder: str, run_cfg: Any = None, *,
                 model_card_extra: Optional[Union[Dict[str, Any], str]] = None,
                 max_seq_length: Optional[int] = None, repo_id: Optional[str] = None,
                 max_shard_size: str = "5GB") -> str:
    """Write ``embedder`` (an unwrapped nvembed Embedder, on any device; not modified) to ``folder``.

    Files: ``config.json`` (the model's ``NVEmbedConfig``: nested backbone ``text_config``, pooling, prompt
    template, auto_map), ``model.safetensors`` (LoRA merged; head included), tokenizer files, the files of
    :mod:`nvembed.hf` (``configuration_nvembed.py``, ``inputs_nvembed.py``, ``modeling_nvembed.py``,
    ``st_nvembed.py``), ``modules.json``, ``sentence_bert_config.json``,
    ``config_sentence_transformers.json``, ``README.md`` and ``nvembed_training.json``. Returns ``folder``.
    ``model_card_extra``: dict (license, language, datasets, tags, base_model, title, description, notes) or text.
    """
    from ..config import to_dict
    from .hf import _unwrap, export_hf
    from .model_card import render_model_card, run_config_dict, scrub, training_record, write_model_card, \
        write_training_record

    check_export_dir(folder)  # never into training weights or a foreign folder, even when called as a library
    emb = _unwrap(embedder)
    export_hf(emb, folder, max_seq_length=max_seq_length, run_cfg=run_cfg, max_shard_size=max_shard_size)
    model_cfg = scrub(to_dict(emb.cfg))
    with open(os.path.join(folder, "config.json")) as f:
        config_json = json.load(f)
    extra = model_card_extra if isinstance(model_card_extra, dict) else None
    write_training_record(folder, training_record(run_cfg, model_cfg, extra))
    card = render_model_card(config_json, model_cfg, scrub(run_config_dict(run_cfg)), model_card_extra, repo_id)
    write_model_card(folder, card)
    check_no_secrets(folder)
    return folder


def push_to_hub(folder: str, repo_id: str, *, private: bool = True, commit_message: str = "Upload nvembed model",
                token: Optional[str] = None) -> str:
    """Upload an exported folder to the Hugging Face Hub (token from ``token``, ``HF_TOKEN`` or ``hf auth login``).
    Returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(url)
