"""Quality-scored data: SFT(Q) and iw-SFT(Q).

With a graded reward instead of a 0/1 filter, the bound weights each sequence by its quality. Two ways to use a
score: as a *sampling* distribution over items (the authors' control scheme: episodes at or above the 90th / 95th /
98th return percentile are repeated 1 / 2 / 3 times, i.e. sampled with probability ∝ level) or as a *loss weight*.
Inputs may be numpy arrays, lists or tensors; outputs are tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _as_float(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: there is nothing to score.")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).nonzero()[0])
        raise ValueError(f"{name}[{bad}] = {t[bad].item()} is not finite; fix or drop that item.")
    return t


def percentile_levels(scores, percentiles: Sequence[float] = (90, 95, 98)) -> torch.Tensor:
    """Number of percentile thresholds each score reaches (``>=``) → ``[E]`` long in ``0..len(percentiles)``.

    Thresholds use linear interpolation between order statistics (numpy's default ``percentile``).
    """
    s = _as_float(scores, "scores")
    if any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles={tuple(percentiles)} must lie in [0, 100].")
    thresholds = torch.quantile(s, torch.tensor([p / 100 for p in percentiles], dtype=torch.float64))
    return (s.unsqueeze(1) >= thresholds.unsqueeze(0)).sum(1)


def level_sampling_probs(levels) -> torch.Tensor:
    """Sampling probabilities ∝ level (level 0 is never sampled) → ``[E]`` float64 summing to 1."""
    lv = _as_float(levels, "levels")
    if (lv < 0).any():
        raise ValueError("levels must be >= 0.")
    total = lv.sum()
    if total <= 0:
        raise ValueError("every level is 0, so no item would ever be sampled; lower the percentiles.")
    return lv / total


def top_fraction_mask(scores, fraction: float) -> torch.Tensor:
    """Boolean mask of the top ``floor(fraction · E)`` items by score (filtered BC / "x% BC").

    Ties at the boundary are broken by position (earlier items first). Raises if the selection is empty.
    """
    s = _as_float(scores, "scores")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1].")
    k = int(math.floor(fraction * s.numel() + 1e-9))
    if k == 0:
        raise ValueError(f"fraction={fraction} of {s.numel()} items selects none; use a fraction >= "
                         f"{1 / s.numel():.3g} or more data.")
    order = torch.sort(-s, stable=True).indices
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def quality_weights(quality, normalize: bool = True) -> torch.Tensor:
    """Non-negative quality scores as loss weights → ``[S]`` float32 (mean 1 when ``normalize``)."""
    q = _as_float(quality, "quality")
    if (q < 0).any():
        bad = int((q < 0).nonzero()[0])
        raise ValueError(f"quality[{bad}] = {q[bad].item()} is negative; quality scores must be >= 0.")
    if normalize:
        mean = q.mean()
        if mean <= 0:
            raise ValueError("all quality scores are 0; nothing would be trained on.")
        q = q / mean
    return q.float()


class QualitySampler(torch.utils.data.Sampler):
    """Distributed sampler that draws items with probability ∝ their sampling weight (SFT(Q) / iw-SFT(Q)).

    Each epoch every rank draws the *same* ``num_samples`` indices with replacement (a generator seeded by
    ``seed + epoch``) and keeps every ``num_replicas``-th one starting at ``rank``, so ranks see disjoint positions of
    one global draw and the epoch is reproducible on resume. Items with weight 0 are never drawn.

    Args:
        weights: ``[N]`` non-negative sampling weights (e.g. quality scores, or :func:`percentile_levels`).
        num_replicas, rank: data-parallel world size and this process's rank.
        num_samples: draws per epoch over all ranks (default ``N``), rounded down to a multiple of ``num_replicas``.
        seed: base seed.
    """

    def __init__(self, weights, num_replicas: int = 1, rank: int = 0, num_samples=None, seed: int = 0):
        w = _as_float(weights, "sampling weights")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("sampling weights must be >= 0 with a positive sum (check the quality column).")
        self.probs = (w / w.sum()).float()
        total = len(w) if num_samples is None else int(num_samples)
        self.per_rank = total // num_replicas
        if self.per_rank < 1:
            raise ValueError(f"{total} draws cannot be split over {num_replicas} processes.")
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.probs, self.per_rank * self.num_replicas, replacement=True, generator=g)
        return iter(draws[self.rank::self.num_replicas].tolist())
