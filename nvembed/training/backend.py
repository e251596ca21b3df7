"""How the model is prepared, stepped, saved and loaded: plain accelerate (one process or DDP) or DeepSpeed ZeRO.

Chosen once per run (:func:`make_backend`); the trainer then never asks which one it has. Both hold the accelerator,
the Embedder (``embedder``: the module whose weights are saved) and the prepared model (``model``: DDP wrapper or
DeepSpeed engine, what forwards and backwards go through).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch

from . import checkpoint as ckpt
from . import deepspeed_utils as ds_utils
from .distributed import on_main


class PlainBackend:
    """accelerate without DeepSpeed: a fresh AdamW and schedule per stage, checkpoints by ``checkpoint.py``."""

    def __init__(self, acc, embedder):
        self.acc, self.embedder = acc, embedder
        self.model = embedder  # until prepare_model

    def load_weights(self, folder: str) -> None:
        """A stage's (or ``init_from``'s) trainable weights into the model (every rank)."""
        self.embedder.load_weights(folder)

    def prepare_model(self) -> None:
        """Setup time, after ``init_from`` is loaded."""
        self.model = self.acc.prepare_model(self.embedder)

    def prepare_stage(self, st, total: int) -> Tuple[Any, Any]:
        """(optimizer, scheduler) of a stage: fresh state, the stage's learning rate and schedule."""
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=st.learning_rate, weight_decay=st.weight_decay)
        scheduler = get_scheduler(st.lr_scheduler, optimizer, num_warmup_steps=st.warmup_steps,
                                  num_training_steps=total)
        return self.acc.prepare(optimizer, scheduler)

    def step(self, optimizer, scheduler, max_grad_norm: float) -> Optional[float]:
        """Clip (if ``max_grad_norm`` > 0), step optimizer and schedule, zero the gradients; returns the grad norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def discard(self, optimizer) -> None:
        """Drop the gradients of a skipped (non-finite) step."""
        optimizer.zero_grad(set_to_none=True)

    def save(self, folder: str, optimizer, scheduler, state: Dict[str, Any]) -> None:
        """Save a checkpoint (``optimizer`` None: a stage's final weights); every rank calls it."""
        from accelerate.utils import gather_object

        acc = self.acc
        acc.wait_for_everyone()
        weights = self.embedder.trainable_state_dict()
        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else None  # every rank's (a collective)
        # a full disk stops every rank, not only the one that writes
        on_main(acc, lambda: ckpt.save_checkpoint(
            folder, embedder=self.embedder, optimizer=optimizer.optimizer if optimizer is not None else None,
            scheduler=scheduler.scheduler if scheduler is not None else None, state=state, weights=weights,
            rng_states=rngs), ckpt.DiskFullError)

    def load(self, folder: str, optimizer, scheduler) -> Dict[str, Any]:
        """Resume from a verified checkpoint: weights, optimizer, schedule, this rank's RNG; returns its state."""
        return ckpt.load_checkpoint(folder, embedder=self.embedder, optimizer=optimizer.optimizer,
                                    scheduler=scheduler.scheduler, rank=self.acc.process_index)

    def full_weights(self):
        """Context (enter on every rank) in which the Embedder holds its full weights, e.g. for the final export."""
        return contextlib.nullcontext(self.embedder)

    def sharded(self) -> bool:
        """Whether every forward is a collective all ranks must join (ZeRO-3 partitions)."""
        return False


class DeepSpeedBackend(PlainBackend):
    """DeepSpeed ZeRO-1/2/3: the engine is built in the first stage and reset for later ones; the engine clips and
    steps inside the last backward of a step; checkpoints hold the sharded state (``deepspeed_utils``)."""

    def __init__(self, acc, embedder):
        super().__init__(acc, embedder)
        self._optimizer = None  # the engine's, kept across stages

    def load_weights(self, folder: str) -> None:
        ds_utils.load_weights(self.acc, self.embedder, folder)  # ZeRO-3: into the partitions

    def prepare_model(self) -> None:
        self.model = self.embedder.to(self.acc.device)  # DeepSpeed wraps model and optimizer together, later

    def prepare_stage(self, st, total: int) -> Tuple[Any, Any]:
        self.model, self._optimizer, scheduler = ds_utils.prepare_stage(self.acc, self.embedder, st, total,
                                                                        self._optimizer)
        return self._optimizer, scheduler

    def step(self, optimizer, scheduler, max_grad_norm: float) -> Optional[float]:
        norm = ds_utils.grad_norm(self.acc)  # the engine already clipped and stepped in the last backward
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def discard(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        ds_utils.discard_grads(self.acc)

    def save(self, folder: str, optimizer, scheduler, state: Dict[str, Any]) -> None:
        ds_utils.save(self.acc, self.embedder, folder, optimizer, state)

    def load(self, folder: str, optimizer, scheduler) -> Dict[str, Any]:
        return ds_utils.load(self.acc, self.embedder, folder)

    @contextlib.contextmanager
    def full_weights(self):
        with ds_utils.gathered(self.acc, self.embedder.parameters()):
            yield self.embedder

    def sharded(self) -> bool:
        return ds_utils.sharded(self.acc, self.embedder)


def make_backend(acc, embedder) -> PlainBackend:
    return DeepSpeedBackend(acc, embedder) if ds_utils.is_deepspeed(acc) else PlainBackend(acc, embedder)
