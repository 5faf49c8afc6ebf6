"""Padded collate that keeps the per-sample ``sample_id`` and ``quality`` (torchtune's ``padded_collate_sft``
returns only ``tokens`` and ``labels``).

Config: ``collate_fn: iwsft.tune.collate.padded_collate_iwsft`` (the recipe binds ``padding_idx`` and
``ignore_idx`` with ``functools.partial``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch

__all__ = ["padded_collate_iwsft"]


def padded_collate_iwsft(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = -100,
    pad_to_multiple_of: int = 1,
) -> Dict[str, torch.Tensor]:
    """Right-pads ``tokens`` and ``labels`` to a common length and stacks the per-sample scalars.

    Args:
        batch: B samples, each with ``tokens`` and ``labels`` (lists or 1-D tensors of ints, possibly of different
            lengths) and optionally ``sample_id`` (int) and ``quality`` (float).
        padding_idx: fill value for ``tokens``.
        ignore_idx: fill value for ``labels``.
        pad_to_multiple_of: round the padded length ``L`` up to a multiple of this (e.g. for compiled kernels).

    Returns:
        ``tokens [B, L] long``, ``labels [B, L] long`` (not shifted: ``labels[b, t]`` is the target of position
        ``t`` itself, exactly as ``padded_collate_sft``), ``sample_id [B] long`` (-1 where a sample has none),
        ``quality [B] float32`` (1.0 where a sample has none). ``L = ceil(max_b len_b / m) * m`` where ``len_b`` is
        the longer of the sample's tokens and labels.
    """
    if not batch:
        raise ValueError("padded_collate_iwsft: empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    toks = [torch.as_tensor(s["tokens"], dtype=torch.long).reshape(-1) for s in batch]
    labs = [torch.as_tensor(s["labels"], dtype=torch.long).reshape(-1) for s in batch]
    longest = max(max(t.numel(), l.numel()) for t, l in zip(toks, labs))
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(batch), length), padding_idx, dtype=torch.long)
    labels = torch.full((len(batch), length), ignore_idx, dtype=torch.long)
    for b, (t, l) in enumerate(zip(toks, labs)):
        tokens[b, : t.numel()] = t
        labels[b, : l.numel()] = l
    sample_id = torch.tensor([int(s.get("sample_id", -1)) for s in batch], dtype=torch.long)
    quality = torch.tensor([float(s.get("quality", 1.0)) for s in batch], dtype=torch.float32)
    return {"tokens": tokens, "labels": labels, "sample_id": sample_id, "quality": quality}
