"""MTEB 2.x: an nvembed :class:`~nvembed.eval.encoders.TextEncoder` as an ``mteb`` encoder, local tasks, a runner.

``mteb`` (pinned in the ``dev`` extras) is imported only inside the functions that need it, so ``nvembed.eval``
works without it.

* :class:`MTEBEncoderWrapper` implements ``mteb.models.EncoderProtocol``: ``encode(inputs, *, task_metadata,
  hf_split, hf_subset, prompt_type)`` where ``inputs`` is a DataLoader of ``{"text": [...], ...}`` batches;
  ``similarity``, ``similarity_pairwise`` and the ``mteb_model_meta`` property.
* Instructions follow NV-Embed: queries (``prompt_type`` query) and symmetric tasks (``prompt_type`` None: STS,
  classification, clustering) get the task instruction, documents none. The instruction is, first found:
  ``instructions[task name]``, the task's own ``TaskMetadata.prompt``, ``default_instruction``, mteb's generic
  prompt for the task type (``AbsTask.abstask_prompt``).
* Documents are written as nvembed's own evaluator writes them (``retrieval.doc_text``: "title. text"), not as
  mteb's default "title text": the same model then scores the same on the same data through either path.
* :func:`local_retrieval_task` / :func:`local_sts_task` build mteb tasks (``AbsTaskRetrieval`` / ``AbsTaskSTS``)
  from local files, so mteb's evaluation runs offline; :func:`resolve_tasks` turns CLI words (an mteb task name,
  a BEIR folder, an STS JSONL) into tasks and :func:`run_mteb` runs ``mteb.evaluate`` and returns main scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from nvembed.errors import UserError

_DOC = {"document", "passage", "corpus", "doc"}


class MTEBTaskError(UserError):
    """An MTEB task that cannot be found or loaded (unknown name, data on the unreachable hub, a bad local file)."""

    kind = "mteb"


def _prompt_type_str(pt) -> Optional[str]:
    if pt is None:
        return None
    return str(getattr(pt, "value", pt)).lower()


def _texts(inputs, is_doc: bool) -> List[str]:
    """Texts from a DataLoader / iterable of mteb batches, or a plain list of strings."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(s, str) for s in inputs):
        return list(inputs)
    from nvembed.eval.retrieval import doc_text

    out: List[str] = []
    for batch in inputs:
        if isinstance(batch, str):
            out.append(batch)
        elif not isinstance(batch, Mapping):
            out.extend(batch)
        elif is_doc and "body" in batch:  # retrieval corpus: mteb also sends title and body apart
            titles = batch.get("title") or [""] * len(batch["body"])
            out.extend(doc_text({"title": t or "", "text": b or ""}) for t, b in zip(titles, batch["body"]))
        else:
            out.extend(batch["text"])
    return out


class MTEBEncoderWrapper:
    """``mteb`` encoder (EncoderProtocol) around any nvembed TextEncoder; see the module docstring."""

    def __init__(self, encoder, *, instructions: Optional[Dict[str, str]] = None,
                 default_instruction: Optional[str] = None, batch_size: int = 32, name: Optional[str] = None,
                 revision: Optional[str] = None):
        self.encoder = encoder
        self.instructions = dict(instructions or {})
        self.default_instruction = default_instruction
        self.batch_size = batch_size
        self.model_name = name or getattr(encoder, "name", "nvembed")
        self.revision = revision
        self.embed_dim: Optional[int] = None  # known after the first encode
        self.calls: List[Dict[str, Any]] = []  # (task, prompt_type, instruction, n) per call, for inspection

    @property
    def mteb_model_meta(self):
        """``mteb.ModelMeta`` (mteb keys results by its name, which must read "organization/model")."""
        from mteb.models.model_meta import ModelMeta

        name = self.model_name if "/" in self.model_name else f"nvembed/{self.model_name}"
        return ModelMeta(loader=None, name=name, revision=self.revision or "local", release_date=None,
                         languages=None, n_parameters=None, memory_usage_mb=None, max_tokens=None,
                         embed_dim=self.embed_dim, license=None, open_weights=None, public_training_code=None,
                         public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine",
                         use_instructions=True, training_datasets=None)

    def instruction_for(self, task_name: Optional[str], prompt_type=None, task_metadata=None) -> Optional[str]:
        pt = _prompt_type_str(prompt_type)
        if pt in _DOC:
            return None
        if task_name is not None and task_name in self.instructions:
            return self.instructions[task_name]
        prompt = getattr(task_metadata, "prompt", None)
        if isinstance(prompt, Mapping):
            prompt = prompt.get(pt or "query")
        if prompt:
            return prompt
        if self.default_instruction is not None or task_metadata is None or task_name is None:
            return self.default_instruction
        try:  # mteb's generic instruction for the task type, as its own instruct-model wrappers use
            from mteb.abstasks.abstask import get_abstask_prompt

            return get_abstask_prompt(task_name) or None
        except ImportError:
            return None

    def encode(self, inputs, *, task_metadata=None, hf_split: Optional[str] = None, hf_subset: Optional[str] = None,
               prompt_type=None, task_name: Optional[str] = None, **kwargs) -> np.ndarray:
        if task_name is None and task_metadata is not None:
            task_name = getattr(task_metadata, "name", None)
        pt = _prompt_type_str(prompt_type)
        texts = _texts(inputs, pt in _DOC)
        ins = self.instruction_for(task_name, prompt_type, task_metadata)
        self.calls.append({"task": task_name, "prompt_type": pt, "instruction": ins, "n": len(texts)})
        emb = self.encoder.encode(texts, instruction=ins, batch_size=kwargs.get("batch_size", self.batch_size),
                                  show_progress=bool(kwargs.get("show_progress_bar", False)))
        if len(emb):
            self.embed_dim = int(emb.shape[1])
        return emb

    # nvembed encoders return L2-normalised rows: cosine similarity is the dot product.
    def similarity(self, a, b) -> np.ndarray:
        return _np(a) @ _np(b).T

    def similarity_pairwise(self, a, b) -> np.ndarray:
        return np.sum(_np(a) * _np(b), axis=-1)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Local tasks: mteb's own task classes with data read from local files.

def _metadata(name: str, task_type: str, main_score: str, path: str, prompt, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(name=name, description=description, type=task_type, main_score=main_score,
                        dataset={"path": path, "revision": "local"}, prompt=prompt, category="t2t",
                        eval_splits=["test"], eval_langs=["eng-Latn"], modalities=["text"])


def local_retrieval_task(folder, *, name: Optional[str] = None, instruction: Optional[str] = None,
                         split: str = "test", max_queries: Optional[int] = None, max_corpus: Optional[int] = None,
                         max_doc_chars: Optional[int] = None, seed: int = 0, allow_missing_docs: bool = False,
                         log=None):
    """An ``AbsTaskRetrieval`` over a BEIR folder, loaded (and checked: bad lines fail naming file and line) and
    subset exactly as :func:`nvembed.eval.retrieval.evaluate_retrieval` does (same ``max_*`` and ``seed`` -> same
    data). ``instruction`` becomes the task's query prompt. The task's split is always called "test"."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    from nvembed.eval.retrieval import doc_text, load_beir, subset_beir

    folder = Path(folder)
    corpus, queries, qrels = load_beir(folder, split, allow_missing_docs=allow_missing_docs, log=log)
    corpus, queries, qrels = subset_beir(corpus, queries, qrels, max_queries=max_queries, max_corpus=max_corpus,
                                         seed=seed)
    if max_doc_chars:  # the whole "title. text" is cut, as doc_text(doc, max_chars) does
        corpus = {d: {"title": "", "text": doc_text(c, max_doc_chars)} for d, c in corpus.items()}
    data = {"corpus": Dataset.from_list([{"id": d, "title": c["title"], "text": c["text"]}
                                         for d, c in corpus.items()]),
            "queries": Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
            "relevant_docs": qrels, "top_ranked": None}

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": data}}
        self.data_loaded = True

    meta = _metadata(name or folder.name, "Retrieval", "ndcg_at_10", str(folder),
                     {"query": instruction} if instruction else None, f"Local BEIR folder {folder}")
    return type("LocalRetrieval", (AbsTaskRetrieval,), {"metadata": meta, "load_data": load_data})()


def local_sts_task(path, *, name: Optional[str] = None, instruction: Optional[str] = None,
                   max_pairs: Optional[int] = None, seed: int = 0):
    """An ``AbsTaskSTS`` over nvembed's STS JSONL (``sentence1``, ``sentence2``, ``score``), subset as
    :func:`nvembed.eval.sts.load_sts` does. ``instruction`` is given to both sentences (symmetric task)."""
    from datasets import Dataset
    from mteb.abstasks.sts import AbsTaskSTS

    from nvembed.eval.sts import load_sts

    path = Path(path)
    try:
        s1, s2, gold = load_sts(path, max_pairs=max_pairs, seed=seed)
    except (KeyError, ValueError) as e:
        raise MTEBTaskError(f"{path}: not an STS JSONL with sentence1, sentence2, score on every line ({e})")
    lo, hi = (min(gold), max(gold)) if gold else (0.0, 1.0)
    ds = Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": gold})

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": ds}}
        self.data_loaded = True

    meta = _metadata(name or path.stem, "STS", "cosine_spearman", str(path), instruction,
                     f"Local STS file {path}")
    return type("LocalSTS", (AbsTaskSTS,), {"metadata": meta, "load_data": load_data,
                                            "min_score": lo, "max_score": hi if hi > lo else lo + 1})()


def resolve_tasks(words: Sequence[str], *, instruction: Optional[str] = None, split: str = "test",
                  max_queries: Optional[int] = None, max_corpus: Optional[int] = None,
                  max_doc_chars: Optional[int] = None, allow_missing_docs: bool = False, log=None) -> list:
    """Each word is a BEIR folder (local retrieval task), an STS ``.jsonl`` file (local STS task) or an mteb task
    name (its data come from the Hugging Face hub when evaluated). Unknown names fail here, before any model runs."""
    import mteb

    tasks = []
    for w in words:
        p = Path(w)
        if p.is_dir():
            tasks.append(local_retrieval_task(p, instruction=instruction, split=split, max_queries=max_queries,
                                              max_corpus=max_corpus, max_doc_chars=max_doc_chars,
                                              allow_missing_docs=allow_missing_docs, log=log))
        elif p.is_file():
            if p.suffix != ".jsonl":
                raise MTEBTaskError(f"{w}: a local task is a BEIR folder or an STS .jsonl file")
            tasks.append(local_sts_task(p, instruction=instruction))
        elif "/" in w or w.endswith(".jsonl"):
            raise MTEBTaskError(f"{w}: no such file or folder")
        else:
            try:
                tasks.append(mteb.get_task(w))
            except KeyError as e:
                msg = str(e.args[0] if e.args else e).removeprefix("KeyError: ")
                raise MTEBTaskError(f"unknown MTEB task '{w}': {msg}") from None
    return tasks


def load_task_data(tasks: Sequence) -> None:
    """Load every task's data now, so a task the offline hub cannot serve fails in one line before any model is
    loaded (mteb then evaluates the preloaded data). Tasks already loaded (``data_loaded``) are skipped, so a caller
    that loaded them up front (scripts/evaluate.py) does not load them twice in :func:`run_mteb`."""
    for task in tasks:
        if getattr(task, "data_loaded", False):
            continue
        try:
            task.load_data()
        except Exception as e:  # noqa: BLE001 -- only loading errors become user errors
            if not _is_loading_error(e):
                raise
            raise MTEBTaskError(f"MTEB task '{task.metadata.name}': its data ({task.metadata.dataset.get('path')}) "
                                f"could not be loaded: {type(e).__name__}: {_first_line(e)}. MTEB task names need "
                                f"the Hugging Face hub (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')});"
                                f" local tasks (a BEIR folder, an STS .jsonl) run offline") from None


def run_mteb(wrapper: MTEBEncoderWrapper, tasks: Sequence, *, batch_size: int = 32,
             show_progress: bool = False) -> Dict[str, Dict[str, Any]]:
    """``mteb.evaluate`` each task (no result cache: a model folder retrained under the same name must not reuse
    old scores). Returns ``{task: {"main_score": metric name, "value": score, "split": ..., "scores": mteb's
    score dict}}``."""
    import mteb

    load_task_data(tasks)
    out: Dict[str, Dict[str, Any]] = {}
    for task in tasks:
        res = mteb.evaluate(wrapper, task, cache=None, co2_tracker=False, show_progress_bar=show_progress,
                            encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress})
        for tr in res.task_results:
            split = "test" if "test" in tr.scores else next(iter(tr.scores))
            scores = tr.scores[split][0]
            out[task.metadata.name] = {"main_score": task.metadata.main_score, "value": float(scores["main_score"]),
                                       "split": split, "scores": scores}
    return out


def _is_loading_error(e: BaseException) -> bool:
    import datasets.exceptions
    import huggingface_hub.errors
    import requests

    return isinstance(e, (OSError, ConnectionError, requests.RequestException, datasets.exceptions.DatasetNotFoundError,
                          huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.OfflineModeIsEnabled))


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""
