"""Weighted negative log-likelihood on (chunked) logits.

The iw-SFT objective for a batch is ``-Σ_b Σ_t sg(w_b) · sg(w_bt) · log p_θ(y_bt) · mask_bt``; dividing by the
number of label tokens gives the per-token loss (``reduction="token"``, torchtune's convention); dividing each
sequence's sum by its own label-token count and averaging over sequences (``reduction="sequence"``) is the
authors' effective objective (REFERENCE §1). Either way the normalisation is by counts, not by Σw.
Keeping the *sum* and the *count* separate lets a training loop accumulate over micro-batches and ranks and divide
once, exactly as torchtune's recipes do, so gradient accumulation and data parallelism stay exact.

Memory: torchtune models can return the logits as a list of chunks along the sequence
(``model.set_num_output_chunks(n)``). :func:`token_log_probs` upcasts one chunk at a time to fp32, so the
fp32 logits of the whole sequence never exist at once, and keeps only ``[B, T]`` fp32 log-probs. Those log-probs,
detached, are also the log-probs of ``q`` = the current model: weighting costs no extra forward pass.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from iwsft.fused import BACKENDS as FUSED_BACKENDS
from iwsft.fused import DEFAULT_CHUNK_SIZE

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def token_log_probs(logits: Logits, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``log p(labels[b, t])`` under ``logits`` → ``[B, T]`` fp32, 0 where ``labels == ignore_index``.

    ``logits`` is ``[B, T, V]`` or a list of chunks ``[B, T_c, V]`` that concatenate to ``T`` along dim 1.
    Labels are already aligned with the logits (shifted by the caller, as torchtune's recipes do). Differentiable.
    """
    chunks = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    sizes = [c.shape[1] for c in chunks]
    if sum(sizes) != labels.shape[1]:
        raise ValueError(f"logits cover {sum(sizes)} positions but labels have {labels.shape[1]}.")
    out = []
    for chunk, lab in zip(chunks, labels.split(sizes, dim=1)):
        b, t, v = chunk.shape
        # cross_entropy(reduction="none") is -log_softmax gathered at the label, and 0 at ignore_index;
        # it is the same fused kernel (and backward) as torchtune's chunked CE, just not summed.
        nll = F.cross_entropy(chunk.reshape(b * t, v).float(), lab.reshape(b * t), ignore_index=ignore_index,
                              reduction="none")
        out.append(-nll.view(b, t))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


REDUCTIONS = ("token", "sequence")


def weighted_nll(token_logp: torch.Tensor, mask: torch.Tensor, seq_weights: Optional[torch.Tensor] = None,
                 token_weights: Optional[torch.Tensor] = None, reduction: str = "token",
                 segment_ids: Optional[torch.Tensor] = None, num_segments: Optional[int] = None):
    """``(loss_sum, denominator)``: accumulate both over micro-batches and ranks, then divide once.

    Per token, ``ℓ_bt = -sg(w_b) · sg(w_bt) · token_logp_bt`` on label positions (``mask``), 0 elsewhere.

    - ``reduction="token"`` (torchtune's convention): ``loss_sum = Σ_bt ℓ_bt``, ``denominator`` = number of label
      tokens. The final loss is the global token mean, so long sequences weigh more.
    - ``reduction="sequence"`` (the authors' effective objective, REFERENCE §1: TRL/transformers 4.46 with one
      sequence per GPU, averaged over ranks): ``loss_sum = Σ_s (Σ_{t∈s} ℓ_t) / n_s`` with ``n_s`` the label tokens
      of sequence ``s``, ``denominator`` = number of sequences with ``n_s > 0``. The final loss
      ``−mean_s[w_s · mean_t log π(y_st)]`` counts every sequence the same whatever its length, and is exact under
      gradient accumulation and any world size (sum the numerators and the counts, divide once). A sequence is a
      row, or with ``segment_ids`` (``[B, T]`` long, ``-1`` = no sequence; packed rows) a segment
      ``0..num_segments-1``.

    Shapes: ``token_logp [B, T]``, ``mask [B, T]`` bool, ``seq_weights [B]`` (one per row; packed rows expand theirs
    to ``token_weights``), ``token_weights [B, T]``. Returns two 0-dim tensors (``denominator`` long). With no
    weights and ``reduction="token"``, ``loss_sum / denominator`` equals torchtune's ``CEWithChunkedOutputLoss``.
    Raises ``ValueError`` for an unknown ``reduction`` or mismatched shapes.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss.reduction={reduction!r}: use 'sequence' (per-sequence mean, then mean over "
                         "sequences: the authors') or 'token' (global token mean: torchtune's).")
    mask = mask.bool()
    nll = -token_logp
    if token_weights is not None:
        nll = nll * token_weights.detach().to(nll.dtype)
    if seq_weights is not None:
        if seq_weights.shape != token_logp.shape[:1]:
            raise ValueError(f"seq_weights must be [B]={tuple(token_logp.shape[:1])}, got {tuple(seq_weights.shape)};"
                             " for packed rows expand them to token_weights with weights[segment_ids].")
        nll = nll * seq_weights.detach().to(nll.dtype).unsqueeze(-1)
    nll = torch.where(mask, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))  # [B, T]
    if reduction == "token":
        return nll.sum(), mask.sum()
    if segment_ids is None:
        sums, counts = nll.sum(-1), mask.sum(-1)  # [B], [B]
    else:
        if num_segments is None:
            raise ValueError("segment_ids needs num_segments.")
        seg = torch.where(mask, segment_ids, torch.full_like(segment_ids, -1)).reshape(-1)
        keep = seg >= 0
        sums = nll.new_zeros(num_segments).index_add_(0, seg[keep], nll.reshape(-1)[keep])  # [S]
        counts = torch.zeros(num_segments, dtype=torch.long, device=nll.device).index_add_(
            0, seg[keep], torch.ones_like(seg[keep]))
    has = counts > 0  # a sequence with no label token adds nothing (and is not counted)
    return (sums / counts.clamp_min(1).to(sums.dtype)).sum(), has.sum()


class ChunkedWeightedNLL(nn.Module):
    """Config-friendly holder of the loss settings (``_component_: iwsft.ChunkedWeightedNLL``).

    Args:
        num_output_chunks: how many sequence chunks the model returns its logits in (memory vs. speed).
        ignore_index: label value of positions that carry no loss (prompt, padding).
        reduction: ``"token"`` (global mean over label tokens, torchtune's) or ``"sequence"`` (each sequence's
            mean, then the mean over sequences: the authors' effective reduction); see :func:`weighted_nll`.
        fused: compute the per-token log-probs with the fused output projection (:mod:`iwsft.fused`: the
            ``[N, V]`` logits never exist; the recipe installs :class:`iwsft.FusedOutputHead` and ignores
            ``num_output_chunks``) instead of from chunked logits. Same values and gradients.
        fused_chunk_size: label tokens per chunk of the fused path (``chunk_size × V`` fp32 at a time).
        fused_backend: ``"torch"`` (plain PyTorch, any device) or ``"cce"`` (cut-cross-entropy kernel, CUDA,
            optional package; untested in CI).
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, reduction: str = "token",
                 fused: bool = False, fused_chunk_size: int = DEFAULT_CHUNK_SIZE, fused_backend: str = "torch"):
        super().__init__()
        if num_output_chunks < 1:
            raise ValueError(f"loss.num_output_chunks={num_output_chunks} must be >= 1.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss.reduction={reduction!r}: use one of {REDUCTIONS}.")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.reduction = reduction
        if fused_chunk_size < 1:
            raise ValueError(f"loss.fused_chunk_size={fused_chunk_size} must be >= 1.")
        if fused_backend not in FUSED_BACKENDS:
            raise ValueError(f"loss.fused_backend={fused_backend!r}: use one of {FUSED_BACKENDS}.")
        self.fused = bool(fused)
        self.fused_chunk_size = int(fused_chunk_size)
        self.fused_backend = fused_backend

    def token_log_probs(self, logits: Logits, labels: torch.Tensor) -> torch.Tensor:
        """See :func:`token_log_probs`."""
        return token_log_probs(logits, labels, self.ignore_index)

    def forward(self, token_logp, mask, seq_weights=None, token_weights=None):
        """See :func:`weighted_nll` (with this loss's ``reduction``); returns ``(loss_sum, denominator)``."""
        return weighted_nll(token_logp, mask, seq_weights, token_weights, reduction=self.reduction)
