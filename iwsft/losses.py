"""Weighted negative log-likelihood on (chunked) logits.

The iw-SFT objective for a batch is ``-Σ_b Σ_t sg(w_b) · sg(w_bt) · log p_θ(y_bt) · mask_bt``; dividing by the
number of label tokens gives the per-token loss (the authors normalise by the label-token count, not by Σw).
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


def weighted_nll(token_logp: torch.Tensor, mask: torch.Tensor, seq_weights: Optional[torch.Tensor] = None,
                 token_weights: Optional[torch.Tensor] = None):
    """``(loss_sum, num_tokens)`` with ``loss_sum = -Σ_bt sg(w_b) · sg(w_bt) · token_logp_bt · mask_bt``.

    Shapes: ``token_logp [B, T]``, ``mask [B, T]`` bool, ``seq_weights [B]``, ``token_weights [B, T]``.
    ``num_tokens = mask.sum()`` (long). With no weights this is the plain SFT negative log-likelihood sum;
    ``loss_sum / num_tokens`` then equals torchtune's ``CEWithChunkedOutputLoss``.
    """
    mask = mask.bool()
    nll = -token_logp
    if token_weights is not None:
        nll = nll * token_weights.detach().to(nll.dtype)
    if seq_weights is not None:
        if seq_weights.shape != token_logp.shape[:1]:
            raise ValueError(f"seq_weights must be [B]={tuple(token_logp.shape[:1])}, got {tuple(seq_weights.shape)};"
                             " for packed rows expand them to token_weights with weights[segment_ids].")
        nll = nll * seq_weights.detach().to(nll.dtype).unsqueeze(-1)
    loss_sum = torch.where(mask, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)).sum()
    return loss_sum, mask.sum()


class ChunkedWeightedNLL(nn.Module):
    """Config-friendly holder of the loss settings (``_component_: iwsft.ChunkedWeightedNLL``).

    Args:
        num_output_chunks: how many sequence chunks the model returns its logits in (memory vs. speed).
        ignore_index: label value of positions that carry no loss (prompt, padding).
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        if num_output_chunks < 1:
            raise ValueError(f"loss.num_output_chunks={num_output_chunks} must be >= 1.")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def token_log_probs(self, logits: Logits, labels: torch.Tensor) -> torch.Tensor:
        """See :func:`token_log_probs`."""
        return token_log_probs(logits, labels, self.ignore_index)

    def forward(self, token_logp, mask, seq_weights=None, token_weights=None):
        """See :func:`weighted_nll`; returns ``(loss_sum, num_tokens)``."""
        return weighted_nll(token_logp, mask, seq_weights, token_weights)
