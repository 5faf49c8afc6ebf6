"""iwsft: importance-weighted supervised fine-tuning (Qin & Springenberg, arXiv 2507.12856).

The weighting core in plain PyTorch (this package never imports torchtune; the torchtune glue is ``iwsft.tune``).
"""

from iwsft.ema import EMA
from iwsft.fused import FusedOutputHead, fused_token_log_probs
from iwsft.losses import ChunkedWeightedNLL, token_log_probs, weighted_nll
from iwsft.quality import (
    QualitySampler,
    level_sampling_probs,
    percentile_levels,
    quality_weights,
    top_fraction_mask,
)
from iwsft.reference import ReferenceLogProbs, fingerprint
from iwsft.weights import (
    WeightingConfig,
    importance_weights,
    normalize_log_weights,
    normalize_weights,
    offsets_to_segment_ids,
    segment_ids_from_mask,
    segment_sum,
    sequence_log_ratio,
    sequence_log_weights,
    sequence_weights,
    token_weights,
    weight_stats,
)

__version__ = "0.1.0"

__all__ = [
    "EMA", "ChunkedWeightedNLL", "FusedOutputHead", "fused_token_log_probs", "QualitySampler", "ReferenceLogProbs", "WeightingConfig", "fingerprint", "importance_weights",
    "level_sampling_probs", "normalize_log_weights", "normalize_weights", "offsets_to_segment_ids", "percentile_levels", "quality_weights",
    "segment_ids_from_mask", "segment_sum", "sequence_log_ratio", "sequence_log_weights", "sequence_weights", "token_log_probs",
    "token_weights", "top_fraction_mask", "weight_stats", "weighted_nll",
]
