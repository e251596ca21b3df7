"""``README.md`` model card and ``nvembed_training.json`` (the run config, secrets scrubbed) of an exported model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Union

SCRUBBED = "***"
# a key is secret if one of its words is one of these, or its last word is "key" (api_key, wandb_key, hf_key, ...),
# unless it names an id/length/size (pad_token_id); "tokenizer", "num_key_value_heads", "max_tokens" are not
_SECRET_WORDS = {"token", "secret", "secrets", "password", "passwd", "pwd", "credential", "credentials", "auth",
                 "apikey", "api_key", "authorization", "cookie", "private_key", "access_key"}
_ENV_SECRET = re.compile(r"(token|secret|password|passwd|credential|api_?key|access_?key|auth)", re.I)


def _words(key: str) -> List[str]:
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))  # camelCase -> camel_case
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.lower()) if w]


_NOT_SECRET_LAST = {"id", "ids", "length", "len", "size", "count", "limit", "dim", "type"}


def is_secret_key(key: Any) -> bool:
    """``hf_token``, ``wandb_api_key``, ``apiKey``, ``password``, ``hub_key`` are; ``tokenizer``,
    ``pad_token_id``, ``num_key_value_heads``, ``max_tokens`` are not."""
    words = _words(str(key))
    if not words or words[-1] in _NOT_SECRET_LAST:
        return False
    joined = "_".join(words)
    return (any(w in _SECRET_WORDS for w in words) or words[-1] == "key" or joined in _SECRET_WORDS
            or joined.endswith("_api_key") or joined.endswith("apikey"))


def env_secret_values(min_len: int = 6) -> List[str]:
    """Values of environment variables whose names look like secrets (HF_TOKEN, WANDB_API_KEY, ...)."""
    return [v for k, v in os.environ.items() if _ENV_SECRET.search(k) and v and len(v) >= min_len]


def scrub(obj: Any, _env: Optional[List[str]] = None) -> Any:
    """Replace values under secret-looking keys (strings and containers; plain numbers/bools are kept, e.g.
    ``pad_token_id``) and any string containing a secret environment value by ``***``."""
    env = env_secret_values() if _env is None else _env
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k) and v is not None and not isinstance(v, (bool, int, float)):
                out[k] = SCRUBBED
            else:
                out[k] = scrub(v, env)
        return out
    if isinstance(obj, (list, tuple)):
        return [scrub(v, env) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in env):
        return SCRUBBED
    return obj


def run_config_dict(run_cfg: Any) -> Dict[str, Any]:
    """A plain dict from a RunConfig, an OmegaConf config, a dict, or None."""
    if run_cfg is None:
        return {}
    if isinstance(run_cfg, dict):
        return json.loads(json.dumps(run_cfg, default=str))
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(run_cfg, DictConfig):
            return OmegaConf.to_container(run_cfg, resolve=True)  # type: ignore[return-value]
        if dataclasses.is_dataclass(run_cfg):
            return OmegaConf.to_container(OmegaConf.structured(run_cfg), resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(run_cfg):
        return dataclasses.asdict(run_cfg)
    return dict(vars(run_cfg))


def training_record(run_cfg: Any, model_cfg: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from . import _versions

    rec = {"format": "nvembed-training/1", "versions": _versions(), "model": model_cfg,
           "run_config": run_config_dict(run_cfg)}
    if extra:
        rec["extra"] = extra
    return scrub(rec)


def write_training_record(folder: str, record: Dict[str, Any]) -> None:
    with open(os.path.join(folder, "nvembed_training.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)


# ---- the card -------------------------------------------------------------------------------------------------------
def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name) and \
        re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None


def _base_model(model: Dict[str, Any]) -> str:
    if model.get("random_init"):
        return f"randomly initialised `{model['random_init'].get('model_type', '?')}` (no pretrained weights)"
    name = model.get("name_or_path") or ""
    if model.get("gguf_file"):
        where = f" from `{name}`" if name else ""
        return f"GGUF file `{os.path.basename(str(model['gguf_file']))}`{where} (dequantised to float)"
    return f"[`{name}`](https://huggingface.co/{name})" if _is_hub_id(name) else f"`{name}`"


def _front_matter(model: Dict[str, Any], extra: Dict[str, Any]) -> str:
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: feature-extraction", "tags:"]
    for t in ["sentence-transformers", "feature-extraction", "sentence-similarity", "text-embeddings", "nvembed",
              *extra.get("tags", [])]:
        lines.append(f"- {t}")
    if extra.get("license"):
        lines.append(f"license: {extra['license']}")
    base = extra.get("base_model") or (model.get("name_or_path") if _is_hub_id(model.get("name_or_path")) else None)
    if base and not model.get("random_init"):
        lines.append(f"base_model: {base}")
    for key in ("language", "datasets"):
        if extra.get(key):
            lines.append(f"{key}:")
            lines.extend(f"- {v}" for v in ([extra[key]] if isinstance(extra[key], str) else extra[key]))
    lines.append("---")
    return "\n".join(lines)


def _stage_rows(run: Dict[str, Any]) -> List[str]:
    defs = run.get("stage_defs") or {}
    rows = ["| stage | datasets | steps | lr (schedule, warm-up) | batch | hard neg. | in-batch neg. | batching | "
            "max len q/d |", "|---|---|---|---|---|---|---|---|---|"]
    for name in run.get("stages") or []:
        st = defs.get(name) or {}
        steps = st.get("max_steps") or f"{st.get('epochs', '?')} epoch(s)"
        datasets = ", ".join(f"`{d}`" for d in st.get("datasets") or []) or "-"
        rows.append(f"| {name} | {datasets} | {steps} | {st.get('learning_rate')} ({st.get('lr_scheduler')}, "
                    f"{st.get('warmup_steps', 0)}) | {st.get('batch_size')} x {st.get('gradient_accumulation_steps', 1)}"
                    f" | {st.get('num_hard_negatives')} | {st.get('in_batch_negatives')} | {st.get('batching')} | "
                    f"{st.get('query_max_length')}/{st.get('doc_max_length')} |")
    return rows if len(rows) > 2 else []


def render_model_card(config_json: Dict[str, Any], model: Dict[str, Any], run: Dict[str, Any],
                      extra: Optional[Union[Dict[str, Any], str]] = None, repo_id: Optional[str] = None) -> str:
    """Markdown model card. ``extra``: a dict (license, language, datasets, tags, base_model, title, description,
    notes) or a string appended as a section."""
    ext: Dict[str, Any] = dict(extra) if isinstance(extra, dict) else {}
    text = config_json.get("text_config") or {}
    lora = model.get("lora") or {}
    loss = run.get("loss") or {}
    where = repo_id or ext.get("repo_id") or "PATH_OR_REPO_ID"
    template = config_json.get("query_template", "Instruct: {instruction}\nQuery: ")
    example_prompt = template.format(instruction="Given a question, retrieve passages that answer the question")
    out = [_front_matter(model, ext), "", f"# {ext.get('title', 'nvembed text embedding model')}", ""]
    if ext.get("description"):
        out += [str(ext["description"]), ""]
    out += [
        "A text embedding model trained with nvembed in the NV-Embed recipe: a decoder LLM "
        "made bidirectional, a pooling head, and contrastive instruction tuning. Embeddings are "
        + ("L2-normalised (use cosine / dot product)." if config_json.get("normalize", True) else "not normalised."),
        "",
        "## Model",
        "",
        f"- **Base model:** {_base_model(model)}",
        f"- **Backbone:** `{text.get('model_type')}`, {text.get('num_hidden_layers')} layers, hidden size "
        f"{text.get('hidden_size')}; attention {'bidirectional (causal mask removed)' if config_json.get('bidirectional', True) else 'causal'}",
    ]
    mode = config_json.get("pooling_mode")
    if mode == "latent_attention":
        out.append(f"- **Pooling:** NV-Embed latent attention ({config_json.get('num_latents')} latents, "
                   f"{config_json.get('num_heads')} heads, head dim {config_json.get('head_dim') or text.get('hidden_size')}, "
                   f"latent dim {config_json.get('latent_dim') or text.get('hidden_size')}, GEGLU FFN x{config_json.get('ff_mult')}) "
                   "then masked mean")
    else:
        from ..hf.modeling_nvembed import POOLING_MODES

        out.append(f"- **Pooling:** {POOLING_MODES.get(mode, mode)}")
    out += [
        f"- **Instruction tokens:** {'excluded from pooling (still attended to)' if config_json.get('exclude_instruction', True) else 'pooled'}; "
        f"query template `{json.dumps(template)[1:-1]}`; documents get no prompt; EOS appended: {config_json.get('add_eos')}",
        f"- **Embedding dimension:** {text.get('hidden_size')}; max sequence length {config_json.get('max_seq_length')}"
        f"; padding side {config_json.get('padding_side')}",
    ]
    if lora.get("enabled", False):
        out.append(f"- **Fine-tuning:** LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                   f"targets {', '.join(lora.get('target_modules') or [])}; **merged into the backbone weights** "
                   "(plain transformers weights, no peft needed)")
    else:
        out.append("- **Fine-tuning:** full fine-tuning of the backbone")
    if loss:
        out.append(f"- **Loss:** InfoNCE, temperature {loss.get('temperature')}"
                   + (f", Matryoshka dims {loss.get('matryoshka_dims')}" if loss.get("matryoshka_dims") else "")
                   + (f", distillation weight {loss.get('distill_weight')}" if loss.get("distill_weight") else ""))
    rows = _stage_rows(run)
    if rows:
        out += ["", "## Training", "", *rows, "",
                f"Seed {run.get('seed')}, precision {run.get('precision')}. The full (scrubbed) run configuration is in "
                "`nvembed_training.json`."]
    out += [
        "",
        "## Usage",
        "",
        "Queries get an instruction that describes the task; documents get none.",
        "",
        "sentence-transformers (the prompt is passed separately, so it is left out of pooling as in training):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        f'model = SentenceTransformer("{where}", trust_remote_code=True)',
        f"q = model.encode([\"how do I reset my password?\"], prompt={json.dumps(example_prompt)})",
        "d = model.encode([\"To reset your password, open Settings and ...\"])",
        "```",
        "",
        "`model.encode_query(texts)` uses the saved `query` prompt (a generic retrieval instruction); for other tasks "
        f"pass `prompt={json.dumps(template)}.format(instruction=TASK)`.",
        "",
        "transformers:",
        "",
        "```python",
        "from transformers import AutoModel",
        f'model = AutoModel.from_pretrained("{where}", trust_remote_code=True)',
        "q = model.encode([\"how do I reset my password?\"], instruction=\"Given a question, retrieve passages that answer the question\")",
        "d = model.encode([\"To reset your password, open Settings and ...\"])  # float32 torch.Tensor, L2-normalised",
        "scores = q @ d.T",
        "```",
        "",
        "`encode(texts, instruction=\"\", max_length=None, batch_size=32, prompt=None, convert_to_numpy=False)`; "
        "`forward(input_ids, attention_mask, pool_mask)` returns the pooled embeddings, and `model.tokenize(texts, "
        "prompts)` builds those inputs. Neither loader needs nvembed installed.",
        "",
        "## License",
        "",
        (f"Released under `{ext['license']}`. " if ext.get("license") else "")
        + "The weights are derived from the base model and are subject to its license and use restrictions; the "
          "training data sets carry their own licenses. Check both before use.",
    ]
    if ext.get("notes"):
        out += ["", "## Notes", "", str(ext["notes"])]
    if isinstance(extra, str) and extra.strip():
        out += ["", extra.strip()]
    return "\n".join(out) + "\n"


def write_model_card(folder: str, text: str) -> None:
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)
