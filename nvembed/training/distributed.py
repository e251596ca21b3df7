"""Collectives for cross-device negatives."""

from __future__ import annotations

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


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0
