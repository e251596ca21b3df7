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
from typing import Any, Dict, Optional, Union

__all__ = ["export_model", "push_to_hub", "check_no_secrets"]


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

    Files: ``config.json`` (``NVEmbedConfig``: nested backbone ``text_config``, pooling, prompt template, auto_map),
    ``model.safetensors`` (LoRA merged; head included), tokenizer files, ``configuration_nvembed.py``,
    ``modeling_nvembed.py``, ``st_nvembed.py``, ``modules.json``, ``sentence_bert_config.json``,
    ``config_sentence_transformers.json``, ``README.md`` and ``nvembed_training.json``. Returns ``folder``.
    ``model_card_extra``: dict (license, language, datasets, tags, base_model, title, description, notes) or text.
    """
    from ..config import to_dict_model
    from .hf import _unwrap, export_hf
    from .model_card import render_model_card, run_config_dict, scrub, training_record, write_model_card, \
        write_training_record

    emb = _unwrap(embedder)
    export_hf(emb, folder, max_seq_length=max_seq_length, run_cfg=run_cfg, max_shard_size=max_shard_size)
    model_cfg = scrub(to_dict_model(emb.cfg))
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
