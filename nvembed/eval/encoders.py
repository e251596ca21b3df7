"""Encoders used by evaluation and mining.

Every evaluator talks to a :class:`TextEncoder`: ``encode(texts, instruction=None)`` returns float32, L2-normalised
rows. ``instruction=None`` means "document / plain text"; a string means "query for this task". The trainer's model
adapter implements the same protocol, so a freshly trained checkpoint is evaluated exactly like a baseline.

:class:`BM25Retriever` is *not* an encoder (it has no vectors); retrieval evaluation accepts it as a lexical baseline.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from nvembed.errors import UserError

DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: "


class ModelLoadError(UserError, ValueError):
    """A model folder cannot be loaded as asked (missing, or it holds custom code that was not trusted)."""

    kind = "model"


@runtime_checkable
class TextEncoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str], *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        """Return float32 ``[len(texts), d]`` with L2-normalised rows."""
        ...


def l2_normalize(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class SentenceTransformerEncoder:
    """Wrap a ``sentence_transformers.SentenceTransformer`` (object or folder/name).

    ``instruction`` becomes a prompt ``query_template.format(instruction=...)`` put before the text (NV-Embed style:
    ``"Instruct: {instruction}\\nQuery: "``). Models trained without instructions (e.g. all-MiniLM) should use
    ``use_instructions=False``: then queries and documents are encoded identically.
    """

    def __init__(self, model, *, name: Optional[str] = None, use_instructions: bool = True,
                 query_template: str = DEFAULT_QUERY_TEMPLATE, max_seq_length: Optional[int] = None,
                 device: Optional[str] = None, trust_remote_code: bool = False):
        if isinstance(model, (str, os.PathLike)):
            from sentence_transformers import SentenceTransformer

            path = str(model)
            model = SentenceTransformer(path, device=device or "cpu", trust_remote_code=trust_remote_code)
            name = name or Path(path).name or path
        self.model = model
        self.name = name or type(model).__name__
        self.use_instructions = use_instructions
        self.query_template = query_template
        if max_seq_length:
            self.model.max_seq_length = int(max_seq_length)

    def prompt(self, instruction: Optional[str]) -> Optional[str]:
        if instruction is None or not self.use_instructions:
            return None
        return self.query_template.format(instruction=instruction)

    def encode(self, texts: Sequence[str], *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        texts = list(texts)
        if not texts:
            dim = self.model.get_sentence_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        kw = {}
        p = self.prompt(instruction)
        if p:
            kw["prompt"] = p
        emb = self.model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress,
                                convert_to_numpy=True, normalize_embeddings=True, **kw)
        return l2_normalize(emb)


class CallableEncoder:
    """Adapt any object whose ``encode(texts, instruction=..., ...)`` returns vectors (e.g. an nvembed model loaded
    through ``transformers.AutoModel(..., trust_remote_code=True)``). Keyword arguments the wrapped ``encode`` does
    not accept are left out; outputs (numpy or torch) are converted to normalised float32."""

    def __init__(self, model, *, name: Optional[str] = None, query_template: Optional[str] = None,
                 use_instructions: bool = True):
        self.model = model
        self.name = name or type(model).__name__
        self.query_template = query_template
        self.use_instructions = use_instructions
        try:
            params = inspect.signature(model.encode).parameters
            self._var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
            self._params = set(params)
        except (TypeError, ValueError):
            self._var_kw, self._params = True, set()

    def _accepts(self, key: str) -> bool:
        return self._var_kw or key in self._params

    def encode(self, texts: Sequence[str], *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        texts = list(texts)
        kw = {}
        if instruction is not None and self.use_instructions:
            if self._accepts("instruction"):
                kw["instruction"] = instruction
            else:
                tmpl = self.query_template or DEFAULT_QUERY_TEMPLATE
                texts = [tmpl.format(instruction=instruction) + t for t in texts]
        if self._accepts("batch_size"):
            kw["batch_size"] = batch_size
        out = self.model.encode(texts, **kw)
        if hasattr(out, "detach"):
            out = out.detach().float().cpu().numpy()
        return l2_normalize(out)


class TruncatedEncoder:
    """Matryoshka evaluation: the first ``dim`` dimensions of another encoder's embeddings, re-normalised (as
    ``MatryoshkaLoss`` trains them and as a truncated index would store them)."""

    def __init__(self, encoder: TextEncoder, dim: int, *, name: Optional[str] = None):
        if isinstance(encoder, BM25Retriever):
            raise TypeError("BM25 has no embeddings to truncate")
        if int(dim) < 1:
            raise ValueError(f"truncation dim must be >= 1, got {dim}")
        self.encoder, self.dim = encoder, int(dim)
        self.name = name or f"{getattr(encoder, 'name', type(encoder).__name__)}@{self.dim}"

    def encode(self, texts: Sequence[str], *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        emb = np.asarray(self.encoder.encode(texts, instruction=instruction, batch_size=batch_size,
                                             show_progress=show_progress), dtype=np.float32)
        if len(emb) and emb.shape[1] < self.dim:  # silently using all dims would report a wrong @d score
            raise ValueError(f"{self.name}: the model's embeddings have {emb.shape[1]} dims, fewer than {self.dim}")
        return l2_normalize(emb[:, :self.dim]) if len(emb) else emb[:, :self.dim]


class BM25Retriever:
    """Lexical baseline: bm25s's Lucene-style BM25 (English stopwords, k1 1.5, b 0.75) computed by
    :mod:`nvembed.eval.bm25` with the texts read ``chunk_size`` at a time, never the whole corpus in memory. Not a
    :class:`TextEncoder`: retrieval evaluation calls :meth:`index` then :meth:`search`; other task types are
    skipped."""

    name = "bm25"

    def __init__(self, *, k1: float = 1.5, b: float = 0.75, stopwords: str = "en", name: str = "bm25",
                 chunk_size: int = 16384):
        self.k1, self.b, self.stopwords, self.name, self.chunk_size = k1, b, stopwords, name, chunk_size
        self._texts, self._ids, self._stats = None, None, None

    def index(self, doc_ids, texts: Sequence[str]) -> "BM25Retriever":
        """Pass 1 over ``texts`` (a sequence that slices: a list, or texts read back from disk such as
        :class:`~nvembed.eval.retrieval.DocTexts`, which is kept and read again by :meth:`search`). ``doc_ids``: a
        sequence, or a function rows -> ids called for the retrieved rows only."""
        from nvembed.eval.bm25 import corpus_stats

        self._ids = doc_ids if callable(doc_ids) else list(doc_ids)
        self._texts = texts
        self._stats = corpus_stats(texts, stopwords=self.stopwords, chunk_size=self.chunk_size)
        return self

    def search(self, queries: Sequence[str], k: int = 100) -> List[Dict[str, float]]:
        """Return, per query, ``{doc_id: score}`` of the top ``k`` documents (documents with score 0 omitted)."""
        from nvembed.eval.bm25 import run_of, search

        if self._stats is None:
            raise RuntimeError("call index() first")
        scores, rows = search(self._texts, self._stats, list(queries), k=k, k1=self.k1, b=self.b,
                              stopwords=self.stopwords, chunk_size=self.chunk_size)
        return run_of(scores, rows, self._ids)


AnyModel = Union[TextEncoder, BM25Retriever]


def custom_code(folder) -> List[str]:
    """What in ``folder`` would make transformers or sentence-transformers import Python code from the folder itself:
    ``auto_map`` entries of ``config.json`` / ``tokenizer_config.json`` (also in module subfolders) and module types
    of ``modules.json`` outside ``sentence_transformers``. Empty for a plain model."""
    folder = Path(folder)
    found: List[str] = []
    dirs = [folder]
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list):
        for m in modules:
            if not isinstance(m, dict):
                continue
            typ = str(m.get("type", ""))
            if typ and not typ.startswith("sentence_transformers."):
                found.append(f"modules.json type {typ}")
            if m.get("path"):
                dirs.append(folder / str(m["path"]))
    for d in dirs:
        for name in ("config.json", "tokenizer_config.json"):
            cfg = _read_json(d / name)
            amap = cfg.get("auto_map") if isinstance(cfg, dict) else None
            if amap:
                values = amap.values() if isinstance(amap, dict) else [amap]
                refs = sorted({str(x) for v in values for x in (v if isinstance(v, (list, tuple)) else [v]) if x})
                found.append(f"{os.path.relpath(d / name, folder)} auto_map {', '.join(refs)}")
    return found


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_nvembed_export(folder) -> bool:
    """``folder`` was exported by nvembed (:func:`nvembed.export.is_export`: not a published NV-Embed checkpoint).
    Such a folder is loaded with nvembed's own copy of the model code, never the folder's copy."""
    from nvembed.export import is_export

    return is_export(folder)


def load_nvembed_export(folder, *, device: Optional[str] = None, max_seq_length: Optional[int] = None):
    """An nvembed export as ``NVEmbedModel`` built from ``nvembed.hf`` (the very code the export ships), so nothing
    in the folder is executed; the tokenizer is loaded without remote code."""
    from transformers import AutoTokenizer

    from nvembed.hf.configuration_nvembed import NVEmbedConfig
    from nvembed.hf.modeling_nvembed import NVEmbedModel

    tok_cfg = _read_json(Path(folder) / "tokenizer_config.json")
    if isinstance(tok_cfg, dict) and tok_cfg.get("auto_map"):
        raise ModelLoadError(f"{folder}: tokenizer_config.json names custom tokenizer code ({tok_cfg['auto_map']}) "
                             f"that would run on load; pass --trust-remote-code (trust_remote_code=True) if you trust "
                             f"this folder")
    model = NVEmbedModel.from_pretrained(str(folder), config=NVEmbedConfig.from_pretrained(str(folder)))
    # config given: transformers does not know model_type "nvembed" and would warn while guessing the tokenizer
    model.tokenizer = AutoTokenizer.from_pretrained(str(folder), config=model.config, trust_remote_code=False)
    if max_seq_length:
        model.config.max_seq_length = int(max_seq_length)
    if device:
        model = model.to(device)
    return model.eval()


def _untrusted(path, reasons: Sequence[str]) -> ModelLoadError:
    return ModelLoadError(f"{path} holds custom model code that would run on load ({'; '.join(reasons)}); pass "
                          f"--trust-remote-code (trust_remote_code=True) if you trust this folder")


def _remote_code_refusal(path, err: Exception) -> Optional[ModelLoadError]:
    """transformers' own refusal of remote code (for what :func:`custom_code` cannot see, e.g. a hub id)."""
    if "trust_remote_code" in str(err):
        return ModelLoadError(f"{path} needs custom model code to load; pass --trust-remote-code "
                              f"(trust_remote_code=True) if you trust it")
    return None


def load_encoder(path: str, *, name: Optional[str] = None, use_instructions: Optional[bool] = None,
                 query_template: str = DEFAULT_QUERY_TEMPLATE, max_seq_length: Optional[int] = None,
                 device: Optional[str] = None, trust_remote_code: bool = False) -> AnyModel:
    """Load an encoder from ``path``.

    * ``"bm25"`` -> :class:`BM25Retriever`.
    * an nvembed export (``config.json`` says so) -> nvembed's own ``NVEmbedModel`` (:func:`load_nvembed_export`;
      the folder's Python files are never executed, with or without ``trust_remote_code``) in a
      :class:`CallableEncoder`.
    * a folder with ``modules.json`` -> ``SentenceTransformer(path)`` wrapped in
      :class:`SentenceTransformerEncoder`. ``use_instructions`` defaults to True unless the model is a small
      BERT-style encoder (heuristic: folder name contains "MiniLM"/"mpnet"); pass it explicitly to be sure.
    * otherwise ``transformers.AutoModel.from_pretrained(path)`` whose model has ``.encode(texts, instruction=...)``
      -> :class:`CallableEncoder`.

    Custom code in the folder (:func:`custom_code`) is executed only with ``trust_remote_code=True``; without it the
    load is refused with a :class:`ModelLoadError` naming the folder and the flag.
    """
    if str(path).lower() == "bm25":
        return BM25Retriever()
    p = Path(path)
    if not p.exists() and (p.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") > 1):
        raise ModelLoadError(f"{path}: no such model folder")
    nm = name or (p.parent.name if p.name in ("model", "models", "") else p.name)
    if p.is_dir() and is_nvembed_export(p):
        model = load_nvembed_export(p, device=device, max_seq_length=max_seq_length)
        return CallableEncoder(model, name=nm, query_template=query_template,
                               use_instructions=use_instructions is not False)
    if p.is_dir() and not trust_remote_code:
        reasons = custom_code(p)
        if reasons:
            raise _untrusted(path, reasons)
    try:
        if (p / "modules.json").exists():
            if use_instructions is None:
                use_instructions = not any(s in str(p).lower() for s in ("minilm", "mpnet"))
            return SentenceTransformerEncoder(str(p), name=nm, use_instructions=use_instructions,
                                              query_template=query_template, max_seq_length=max_seq_length,
                                              device=device, trust_remote_code=trust_remote_code)
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except ValueError as e:
        refusal = None if trust_remote_code else _remote_code_refusal(path, e)
        if refusal is None:
            raise
        raise refusal from e
    if device:
        model = model.to(device)
    model.eval()
    if not hasattr(model, "encode"):
        raise ModelLoadError(f"{path}: model class {type(model).__name__} has no .encode(texts, instruction=...); "
                             f"give a sentence-transformers folder or an nvembed export")
    return CallableEncoder(model, name=nm, query_template=query_template,
                           use_instructions=use_instructions is not False)
