"""sentence-transformers input module for an exported nvembed model (remote code; needs no ``nvembed`` install).

``modules.json`` names ``st_nvembed.NVEmbedSTModule``; ``SentenceTransformer(FOLDER, trust_remote_code=True)`` imports
this file from the model folder and calls :meth:`NVEmbedSTModule.load`, which loads the transformers model of the same
folder (``AutoModel`` + ``modeling_nvembed.py``). sentence-transformers hands the prompt to :meth:`preprocess`
separately from the texts, so the prompt tokens are left out of the pooled mean exactly as in training (the prompt
is still attended to). ``prompt`` follows ``AutoModel.encode(instruction=...)``: a full ``"Instruct: {task}\\nQuery: "``
prompt is used as given, a bare task is wrapped in the query template. The module outputs the final
(L2-normalised) ``sentence_embedding``; no Pooling/Normalize module follows.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch
from torch import nn

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule as _Base
except ImportError:  # pragma: no cover - sentence-transformers 3.x-5.x
    try:
        from sentence_transformers.models import InputModule as _Base
    except ImportError:
        _Base = nn.Module


class NVEmbedSTModule(_Base):
    """Tokenizes (prompt excluded from pooling) and embeds with the folder's ``NVEmbedModel``."""

    config_file_name = "sentence_bert_config.json"
    config_keys = ["max_seq_length"]
    save_in_root = True

    def __init__(self, model_name_or_path: str, max_seq_length: Optional[int] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None, subfolder: str = "", cache_folder: Optional[str] = None,
                 revision: Optional[str] = None, local_files_only: bool = False, token=None, **unused):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        hub = {"revision": revision, "local_files_only": local_files_only, "token": token}
        if cache_folder:
            hub["cache_dir"] = cache_folder
        if subfolder:
            hub["subfolder"] = subfolder
        kwargs = dict(model_kwargs or {})
        kwargs.pop("trust_remote_code", None)
        # the user already opted in (sentence-transformers refuses to import this file otherwise)
        self.auto_model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=True, **hub, **kwargs)
        self.auto_model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=True, **hub)
        self.auto_model.tokenizer = self.tokenizer  # sets pad token and padding side from the model config
        self.max_seq_length = int(max_seq_length or self.auto_model.config.max_seq_length)

    # -- sentence-transformers module API ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder: Optional[str] = None,
             revision: Optional[str] = None, local_files_only: bool = False,
             model_kwargs: Optional[Dict[str, Any]] = None, **kwargs) -> "NVEmbedSTModule":
        config: Dict[str, Any] = {}
        path = os.path.join(model_name_or_path, subfolder, cls.config_file_name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        elif hasattr(cls, "load_config"):
            config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                     revision=revision, local_files_only=local_files_only)
        return cls(model_name_or_path, max_seq_length=config.get("max_seq_length"), model_kwargs=model_kwargs,
                   subfolder=subfolder, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only, token=token)

    @property
    def modalities(self) -> List[str]:
        return ["text"]

    def preprocess(self, inputs, prompt: Optional[str] = None, **kwargs) -> Dict[str, torch.Tensor]:
        texts = []
        for x in inputs:
            if isinstance(x, str):
                texts.append(x)
            elif isinstance(x, dict) and isinstance(x.get("text"), str):
                texts.append(x["text"])
            else:
                raise ValueError(f"NVEmbedSTModule embeds single texts, got {type(x).__name__}")
        # same rule as AutoModel.encode(instruction=...): a full "Instruct: ...\nQuery: " prompt is used as given,
        # a bare task is wrapped in the query template (it would otherwise be a prompt the model never saw)
        prefix = self.auto_model.build_prompt(prompt)
        try:
            return self.auto_model.tokenize(texts, [prefix] * len(texts), max_length=self.max_seq_length)
        except TypeError as e:  # never let sentence-transformers' fallback silently prepend the prompt instead
            raise ValueError(f"NVEmbedSTModule.preprocess failed: {e}") from e

    def tokenize(self, texts, **kwargs) -> Dict[str, torch.Tensor]:  # older sentence-transformers
        return self.preprocess(texts, **kwargs)

    def forward(self, features: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        emb = self.auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                              pool_mask=features.get("pool_mask"))
        features["sentence_embedding"] = emb
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.auto_model.config.text_config.hidden_size)

    def get_sentence_embedding_dimension(self) -> int:  # older sentence-transformers
        return self.get_embedding_dimension()

    def get_config_dict(self) -> Dict[str, Any]:
        return {"max_seq_length": self.max_seq_length}

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        os.makedirs(output_path, exist_ok=True)
        self.auto_model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        with open(os.path.join(output_path, self.config_file_name), "w", encoding="utf-8") as f:
            json.dump(self.get_config_dict(), f, indent=2)
        here = os.path.abspath(__file__)
        if os.path.abspath(os.path.join(output_path, os.path.basename(here))) != here:
            shutil.copyfile(here, os.path.join(output_path, os.path.basename(here)))

    def __repr__(self) -> str:
        c = self.auto_model.config
        return (f"NVEmbedSTModule(backbone={c.text_config.model_type}, pooling={c.pooling_mode}, "
                f"max_seq_length={self.max_seq_length})")
