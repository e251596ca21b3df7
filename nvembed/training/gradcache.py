"""GradCache (Gao et al. 2021, arXiv 2101.06983): the contrastive loss of a big batch with the memory of a chunk.

Pass 1 embeds queries and documents chunk by chunk without a graph, recording the RNG state before each chunk. The
loss (with the cross-device all-gather of ``ContrastiveObjective.loss``) is computed on the detached embeddings and
differentiated w.r.t. them only. Pass 2 re-runs each chunk with a graph under the recorded RNG state (so dropout
masks are the same as in pass 1) and back-propagates the surrogate ``sum(emb * d loss/d emb) * scale``, whose
parameter gradient is exactly the chunk's share of d loss/d params.

Composition with data parallelism
    * DDP: every chunk but the very last of the optimizer step runs under ``no_sync``; the last backward all-reduces
      the gradients accumulated in ``.grad``.
    * DeepSpeed (ZeRO-1/2/3, offload): every chunk is an ordinary ``accelerator.backward`` = ``engine.backward``,
      i.e. a DeepSpeed *micro-step* with the gradient-accumulation boundary set to False, except the last chunk of
      the step, which is the boundary (the engine then steps once). Each engine.backward runs the ZeRO epilogue, so
      no parameter is reduced twice inside one backward. The failure of sentence-transformers #3173 / tevatron #206
      ("Gradient computed twice for this partition") comes from running the chunk backwards *inside* another
      backward (a hook on the loss) or from several backwards the engine does not know are micro-steps; neither
      happens here. The loss backward of pass 1 touches no parameter (it starts from detached leaves), so the
      engine never sees it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch

from ..losses import LossOutput
from ..model.bucketing import restore_order, select_rows
from .distributed import sync_context


class RandState:
    """CPU and (current) CUDA RNG state, restorable without disturbing the global generators."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def split_features(feats: Dict[str, torch.Tensor], chunk: int, order: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Chunks of ``chunk`` rows taken in ``order``, each cut to its own longest sequence (less padding per chunk)."""
    return [select_rows(feats, order[s:s + chunk]) for s in range(0, len(order), chunk)]


def by_length(feats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Row order longest first: chunks of neighbours in it have similar lengths."""
    return torch.argsort(feats["attention_mask"].sum(dim=1), descending=True, stable=True)


def _embed_no_grad(model, chunks, autocast, device) -> Tuple[torch.Tensor, List[RandState]]:
    states, embs = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(RandState(device))
            with autocast():
                embs.append(model(**c))
    return torch.cat(embs, dim=0), states


def grad_cache_backward(objective, model, acc, batch, chunk: int, scale: float = 1.0,
                        sync: bool = True) -> LossOutput:
    """Loss and accumulated gradients of one micro-batch, computed in chunks of ``chunk`` texts.

    ``objective``: the stage's :class:`~nvembed.training.objective.ContrastiveObjective`; ``model``: the prepared
    (DDP / DeepSpeed) model; ``acc``: the accelerator. ``sync``: this micro-batch ends the optimizer step (DDP
    all-reduces / DeepSpeed steps after its last chunk). Returns the (detached) loss; a non-finite loss on any process
    skips pass 2 on every process.
    """
    device = batch.queries["input_ids"].device
    # chunks of similar length (rows sorted by length): each is padded only to its own longest text, and the
    # model's length bucketing finds nothing left to split into (tiny sub-batches would cost a call each)
    q_order, d_order = by_length(batch.queries), by_length(batch.docs)
    q_chunks = split_features(batch.queries, chunk, q_order)
    d_chunks = split_features(batch.docs, chunk, d_order)

    # pass 1: embeddings without graphs, back in batch order
    q, q_states = _embed_no_grad(model, q_chunks, acc.autocast, device)
    d, d_states = _embed_no_grad(model, d_chunks, acc.autocast, device)
    q = restore_order(q, q_order).detach().float().requires_grad_(True)
    d = restore_order(d, d_order).detach().float().requires_grad_(True)

    # loss on the cached embeddings (cross-device gather included), gradient w.r.t. the embeddings only
    with acc.autocast():
        out = objective.loss(q, d, batch)
    finite = torch.isfinite(out.loss.detach()).float().reshape(1)
    if acc.num_processes > 1:
        finite = acc.reduce(finite, reduction="sum")
    if finite.item() < acc.num_processes:
        return LossOutput(loss=torch.full_like(out.loss.detach(), float("nan")), accuracy=out.accuracy,
                          logits=out.logits.detach())
    q_grad, d_grad = torch.autograd.grad(out.loss, [q, d])

    # pass 2: re-embed each chunk with a graph, replaying its RNG state; one (micro-step) backward per chunk
    work = [(c, s, g) for c, s, g in zip(q_chunks, q_states, q_grad[q_order].split(chunk))]
    work += [(c, s, g) for c, s, g in zip(d_chunks, d_states, d_grad[d_order].split(chunk))]
    for i, (feats, state, grad) in enumerate(work):
        last = sync and i == len(work) - 1
        with sync_context(acc, model, last):
            with state.replay():
                with acc.autocast():
                    emb = model(**feats)
            surrogate = (emb.float() * grad.to(emb.device)).sum() * scale
            acc.backward(surrogate)
    return LossOutput(loss=out.loss.detach(), accuracy=out.accuracy, logits=out.logits.detach())


__all__ = ["grad_cache_backward", "split_features", "RandState"]
