"""Tiny wrappers around ``torch.distributed`` that are no-ops in a single process.

The weighting core is used both inside torchrun/FSDP2 jobs and in plain single-process scripts (control/, tests);
these helpers let the same code run in both without ``if dist.is_initialized()`` scattered everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (unchanged without a process group)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
