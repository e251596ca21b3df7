"""Collectives for cross-device negatives, decide-on-main-and-share, and the no-sync context of accumulation."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, keeping the autograd graph.

    The backward of ``torch.distributed.nn.all_gather`` sums each slice's gradient from every rank back to its owner,
    so with per-rank losses averaged by data parallelism the gradients equal one process holding the whole batch.
    Requires equal shapes on every rank (the batcher gives each rank the same number of examples).
    """
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def on_main(acc, fn, errors):
    """Run ``fn()`` on the main process only and share its result; one of ``errors`` raised there is raised again on
    every rank (same type and message), so no rank waits in a collective for one that stopped."""
    box: list = [None, None]
    if acc is None or acc.is_main_process:
        try:
            box[0] = fn()
        except errors as e:
            box[1] = (type(e), str(e))
    if acc is not None and acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    if box[1] is not None:
        raise box[1][0](box[1][1])
    return box[0]


@contextmanager
def sync_context(accelerator, model, sync: bool):
    """One backward of a multi-backward optimizer step (gradient accumulation, GradCache chunks).

    ``sync=False``: accumulate locally. Under DDP that is ``model.no_sync()``; under DeepSpeed it sets accelerate's
    ``sync_gradients`` flag, which ``accelerator.backward`` passes to the engine as the gradient-accumulation
    boundary, so the engine treats the backward as a micro-step and only steps (clip, optimizer, scheduler, zero
    grad) after the backward with ``sync=True``. The flag is restored afterwards: accelerate's optimizer wrapper
    skips ``step()`` while it is False.
    """
    from accelerate.utils import DistributedType

    state = accelerator.gradient_state
    before = state.sync_gradients
    ctx = nullcontext()
    if not sync:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            state._set_sync_gradients(False)
        elif hasattr(model, "no_sync") and accelerator.num_processes > 1:
            ctx = model.no_sync()
    try:
        with ctx:
            yield
    finally:
        state._set_sync_gradients(before)
