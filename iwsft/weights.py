"""Importance weights for iw-SFT (Qin & Springenberg, arXiv 2507.12856).

SFT on curated data maximises ``E_ref[R · log p_θ]``, a loose lower bound of ``J(θ) = E_ref[R · p_θ / p_ref]``.
Inserting an auxiliary policy ``q`` gives the tighter bound whose θ-part is ``E_{D+}[sg(q / p_ref) · log p_θ]``.
Per sequence (or episode) ``y`` of ``T`` tokens (steps) the weight used in practice is

    w(y) = clip( exp( temperature · mean_t[ log q(y_t) − log p_ref(y_t) ] ), clip_min, clip_max )

and the per-token (per-step) variant is ``w_t = clip(exp(temperature · (log q(y_t) − log p_ref(y_t))))``.
Weights are constants for the optimiser (stop-gradient): every function here runs under ``torch.no_grad``.

Layouts. *Padded*: log-probs ``[B, T]`` with a boolean ``mask [B, T]`` (True on response/label tokens); one
sequence per row. *Packed or flat*: log-probs of any shape with ``segment_ids`` of the same shape (``-1`` = not
part of any sequence) and ``num_segments`` — several sequences per row (packing) or episodes laid end to end in a
flat ``[N]`` array (control). Clipping happens in log space, so extreme log-ratios never overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

import torch.distributed as dist

from iwsft.distributed import all_reduce_sum, is_dist

LEVELS = ("sequence", "token")


@dataclass(frozen=True)
class WeightingConfig:
    """How importance weights are formed. Use :meth:`llm` / :meth:`control` for the authors' settings."""

    level: str = "sequence"  # "sequence": one weight per sequence/episode; "token": one weight per token/step
    temperature: float = 1.0  # multiplies the mean log-ratio before exp (authors: 1.0 LLM, 10.0 control)
    clip_min: Optional[float] = 0.0  # lower clip of the weight itself (None = no lower clip)
    clip_max: Optional[float] = 16.0  # upper clip of the weight itself (None = no upper clip; may overflow)
    normalize: bool = False  # divide by the mean weight over the global batch (all ranks), so mean weight is 1

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"weighting.level={self.level!r} is not one of {LEVELS}; use 'sequence' or 'token'.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"weighting.temperature={self.temperature!r} must be a finite number >= 0.")
        if self.clip_min is not None and not self.clip_min >= 0:
            raise ValueError(f"weighting.clip_min={self.clip_min!r} must be >= 0 (or null for no lower clip).")
        if self.clip_max is not None and not self.clip_max > 0:
            raise ValueError(f"weighting.clip_max={self.clip_max!r} must be > 0 (or null for no upper clip).")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min > self.clip_max:
            raise ValueError(
                f"weighting.clip_min={self.clip_min} is larger than weighting.clip_max={self.clip_max}; swap them."
            )

    @classmethod
    def llm(cls, **overrides) -> "WeightingConfig":
        """Authors' LLM setting: per sequence, temperature 1, weight clipped to [0, 16], no batch normalisation."""
        return replace(cls("sequence", 1.0, 0.0, 16.0, False), **overrides)

    @classmethod
    def llm_token(cls, **overrides) -> "WeightingConfig":
        """Authors' token-level LLM variant: ``clip(exp(log q − log p_ref), 0.2, 1.8)`` per token."""
        return replace(cls("token", 1.0, 0.2, 1.8, False), **overrides)

    @classmethod
    def control(cls, **overrides) -> "WeightingConfig":
        """Authors' control setting: per episode, temperature 10, clip [0, 1000], normalised over the batch."""
        return replace(cls("sequence", 10.0, 0.0, 1000.0, True), **overrides)


def offsets_to_segment_ids(offsets: torch.Tensor) -> torch.Tensor:
    """Episode offsets ``[E+1]`` (episode ``e`` is ``offsets[e]:offsets[e+1]``) → segment id per step ``[N]``.

    ``offsets[0]`` need not be 0; steps before it get ``-1``.
    """
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    lengths = offsets[1:] - offsets[:-1]  # [E]
    if (lengths < 0).any():
        raise ValueError("offsets must be non-decreasing (episode e spans offsets[e]:offsets[e+1]).")
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths)
    if offsets.numel() and offsets[0] > 0:
        ids = torch.cat([ids.new_full((int(offsets[0]),), -1), ids])
    return ids


def segment_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Padded ``mask [B, T]`` → ``segment_ids [B, T]``: the row index where mask is True, else -1."""
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    return torch.where(mask.bool(), rows, torch.full_like(rows, -1))


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum ``values`` (any shape) into ``[num_segments]`` by ``segment_ids`` (same shape, -1 = ignored)."""
    if values.shape != segment_ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and segment_ids {tuple(segment_ids.shape)} differ in shape.")
    ids = segment_ids.reshape(-1)
    keep = ids >= 0
    vals = values.reshape(-1)
    # torch.where instead of multiplication: ignored positions may hold ±inf/NaN (e.g. log-probs of padding).
    vals = torch.where(keep, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    out = torch.zeros(num_segments, dtype=vals.dtype, device=vals.device)
    return out.index_add_(0, ids.clamp_min(0), vals)


def _segment_mean_diff(logp_q, logp_ref, mask, segment_ids, num_segments):
    """Per-sequence mean of ``logp_q − logp_ref`` and the token counts (fp32)."""
    diff = logp_q.detach().float() - logp_ref.detach().float()
    if segment_ids is None:
        if diff.dim() != 2:
            raise ValueError(f"padded layout expects log-probs [B, T], got {tuple(diff.shape)}; "
                             "pass segment_ids for flat or packed layouts.")
        if mask is None:
            mask = torch.ones_like(diff, dtype=torch.bool)
        mask = mask.bool()
        sums = torch.where(mask, diff, torch.zeros((), device=diff.device)).sum(-1)  # [B]
        counts = mask.sum(-1)  # [B]
    else:
        if num_segments is None:
            num_segments = int(segment_ids.max().item()) + 1 if segment_ids.numel() else 0
        sums = segment_sum(diff, segment_ids, num_segments)  # [S]
        counts = segment_sum(torch.ones_like(diff), segment_ids, num_segments)  # [S]
    # Empty sequences have sum 0 → log-ratio 0 (weight exp(0) = 1, clipped); they contribute no loss anyway.
    return sums / counts.clamp_min(1), counts


@torch.no_grad()
def sequence_log_ratio(logp_q, logp_ref, mask=None, segment_ids=None, num_segments=None) -> torch.Tensor:
    """``mean_t[log q(y_t) − log p_ref(y_t)]`` per sequence → ``[S]`` fp32 (``[B]`` for the padded layout)."""
    return _segment_mean_diff(logp_q, logp_ref, mask, segment_ids, num_segments)[0]


def _clipped_log(log_w: torch.Tensor, clip_min, clip_max) -> torch.Tensor:
    """``log clip(exp(log_w), clip_min, clip_max)`` = ``clamp(log_w, log clip_min, log clip_max)``."""
    lo = math.log(clip_min) if clip_min else None  # clip_min of 0 or None: exp() is already >= 0
    hi = math.log(clip_max) if clip_max is not None else None
    return log_w.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else log_w


@torch.no_grad()
def sequence_log_weights(log_ratio: torch.Tensor, temperature: float = 1.0, clip_min: Optional[float] = 0.0,
                         clip_max: Optional[float] = 16.0) -> torch.Tensor:
    """``log clip(exp(temperature · log_ratio), clip_min, clip_max)`` (fp32): the weights before ``exp``, for
    :func:`normalize_log_weights` (which then cannot underflow)."""
    return _clipped_log(temperature * log_ratio.detach().float(), clip_min, clip_max)


@torch.no_grad()
def sequence_weights(log_ratio: torch.Tensor, temperature: float = 1.0, clip_min: Optional[float] = 0.0,
                     clip_max: Optional[float] = 16.0) -> torch.Tensor:
    """``clip(exp(temperature · log_ratio), clip_min, clip_max)`` → same shape as ``log_ratio`` (fp32)."""
    return sequence_log_weights(log_ratio, temperature, clip_min, clip_max).exp()


@torch.no_grad()
def token_weights(logp_q, logp_ref, mask=None, temperature: float = 1.0, clip_min: Optional[float] = 0.2,
                  clip_max: Optional[float] = 1.8) -> torch.Tensor:
    """Per-token ``clip(exp(temperature · (log q − log p_ref)), clip_min, clip_max)`` → ``[B, T]``; 0 off-mask."""
    valid = torch.ones_like(logp_q, dtype=torch.bool) if mask is None else mask.bool()
    w = _token_log_weights(logp_q, logp_ref, valid, temperature, clip_min, clip_max).exp()
    return torch.where(valid, w, torch.zeros((), device=w.device))


def _token_log_weights(logp_q, logp_ref, valid, temperature, clip_min, clip_max) -> torch.Tensor:
    """Per-token clipped log-weights ``[B, T]`` (0 off ``valid``, so padding's ±inf never reaches ``exp``)."""
    diff = logp_q.detach().float() - logp_ref.detach().float()
    diff = torch.where(valid, diff, torch.zeros((), device=diff.device))
    return _clipped_log(temperature * diff, clip_min, clip_max)


@torch.no_grad()
def normalize_weights(weights: torch.Tensor, valid: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
    """``w / mean(w)``, the mean taken over the valid entries of the *global* batch (summed over all ranks).

    With this, ``Σ w_i · l_i / n`` equals the self-normalised estimate ``Σ w_i l_i / Σ w_i`` of the whole
    data-parallel batch, whatever the number of ranks. A batch whose weights are all 0 is returned unchanged.
    """
    w = weights.detach().float()
    valid = torch.ones_like(w, dtype=torch.bool) if valid is None else valid.bool()
    totals = torch.stack([torch.where(valid, w, torch.zeros((), device=w.device)).sum(), valid.sum().float()])
    all_reduce_sum(totals, group=group)  # one collective for both numbers
    mean = totals[0] / totals[1].clamp_min(1)
    return torch.where(mean > 0, w / mean.clamp_min(torch.finfo(w.dtype).tiny), w)


@torch.no_grad()
def normalize_log_weights(log_weights: torch.Tensor, valid: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
    """:func:`normalize_weights` of ``exp(log_weights)``, computed without underflow.

    Normalisation is scale-free, so the weights are shifted by their global maximum (all-reduced) before ``exp``:
    a batch whose every weight would underflow to 0 (e.g. temperature 10 and log-ratios of -80) still gets the
    correct relative weights instead of a silent all-zero step.
    """
    lw = log_weights.detach().float()
    valid = torch.ones_like(lw, dtype=torch.bool) if valid is None else valid.bool()
    neg_inf = torch.full((), float("-inf"), device=lw.device)
    top = torch.where(valid, lw, neg_inf).max() if lw.numel() else neg_inf
    if is_dist():
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    if not torch.isfinite(top):  # nothing valid anywhere (or every weight is exactly 0): leave the zeros alone
        return torch.where(valid, lw.exp(), torch.zeros((), device=lw.device))
    w = torch.where(valid, (lw - top).exp(), torch.zeros((), device=lw.device))
    return normalize_weights(w, valid, group=group)


@torch.no_grad()
def weight_stats(weights: torch.Tensor, valid: Optional[torch.Tensor] = None, clip_min: Optional[float] = None,
                 clip_max: Optional[float] = None, log_ratio: Optional[torch.Tensor] = None) -> dict:
    """Summary of a batch of weights for logging (plain floats).

    ``weight_ess`` is the effective-sample-size fraction ``(Σw)² / (n · Σw²)`` in ``[0, 1]`` (1 = uniform).
    ``weight_clip_hi`` / ``weight_clip_lo`` are the fractions of weights sitting at ``clip_max`` / ``clip_min``.
    """
    w = weights.detach().float().reshape(-1)
    if valid is not None:
        w = w[valid.bool().reshape(-1)]
    if w.numel() == 0:
        return {}
    n = w.numel()
    sq = (w * w).sum()
    stats = {
        "weight_mean": w.mean().item(),
        "weight_std": w.std(unbiased=False).item(),
        "weight_min": w.min().item(),
        "weight_max": w.max().item(),
        "weight_ess": ((w.sum() ** 2) / (n * sq)).item() if sq > 0 else 0.0,
    }
    if clip_max is not None:
        stats["weight_clip_hi"] = (w >= clip_max * (1 - 1e-6)).float().mean().item()
    if clip_min:
        stats["weight_clip_lo"] = (w <= clip_min * (1 + 1e-6)).float().mean().item()
    if log_ratio is not None and log_ratio.numel():
        stats["log_ratio_mean"] = log_ratio.detach().float().mean().item()
    return stats


@torch.no_grad()
def importance_weights(logp_q: torch.Tensor, logp_ref: torch.Tensor, cfg: WeightingConfig = WeightingConfig(),
                       mask: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                       num_segments: Optional[int] = None, group=None):
    """Weights of ``cfg.level`` from per-token log-probs of ``q`` and ``p_ref``.

    Returns ``(weights, log_ratio)``: weights ``[S]`` for ``level="sequence"`` (``[B]`` padded) or the shape of the
    log-probs for ``level="token"`` (0 off-mask); ``log_ratio [S]`` is the per-sequence mean log-ratio (for logging).
    With ``cfg.normalize`` the weights are divided by their global-batch mean (see :func:`normalize_weights`).
    """
    log_ratio, counts = _segment_mean_diff(logp_q, logp_ref, mask, segment_ids, num_segments)
    if cfg.level == "sequence":
        valid = counts > 0
        log_w = sequence_log_weights(log_ratio, cfg.temperature, cfg.clip_min, cfg.clip_max)  # [S]
    else:
        if segment_ids is not None:
            valid = segment_ids >= 0
        else:
            valid = torch.ones_like(logp_q, dtype=torch.bool) if mask is None else mask.bool()
        log_w = _token_log_weights(logp_q, logp_ref, valid, cfg.temperature, cfg.clip_min, cfg.clip_max)  # [B, T]
    if cfg.normalize:
        w = normalize_log_weights(log_w, valid, group=group)
    else:
        w = log_w.exp()
    if cfg.level == "token":
        w = torch.where(valid, w, torch.zeros((), device=w.device))
    return w, log_ratio
