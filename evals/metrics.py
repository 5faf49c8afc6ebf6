"""Per-problem metrics over k samples and a bootstrap confidence interval.

For one problem with k sampled outputs:
- ``acc``       mean correctness over the k samples (avg@k; with k = 1 this is the greedy score);
- ``maj_at_k``  1 if the most frequent (equivalence-pooled) answer is correct (maj@k);
- ``pass_at_k`` 1 if any of the k samples is correct (pass@k);
- ``no_answer``  number of samples that finished without a readable answer;
- ``truncated``  number of samples with no readable answer that hit ``max_gen_toks`` (inferred, see
  :func:`evals.scoring.looks_truncated`);
- ``unparseable`` ``no_answer + truncated`` (kept for older result files and scripts).
The task score is the mean over problems; the 95% interval is a percentile bootstrap over problems
(numpy, seeded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evals.scoring import NO_ANSWER, TRUNCATED, Verdict, majority_answer, pred_correct


def sample_metrics(kind: str, verdicts: Sequence[Verdict], gold: str) -> dict[str, float]:
    """The per-problem metrics of :mod:`evals.metrics` from k verdicts."""
    k = len(verdicts)
    if k == 0:
        raise ValueError("no outputs for this problem")
    correct = [v.correct for v in verdicts]
    majority = majority_answer(kind, [v.pred if v.parseable else None for v in verdicts])
    return {
        "acc": sum(correct) / k,
        "maj_at_k": float(pred_correct(kind, majority, gold)) if majority is not None else 0.0,
        "pass_at_k": float(any(correct)),
        "no_answer": float(sum(v.status == NO_ANSWER for v in verdicts)),
        "truncated": float(sum(v.status == TRUNCATED for v in verdicts)),
        "unparseable": float(sum(not v.parseable for v in verdicts)),
    }


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError("k must be <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_ci(values: Sequence[float], n_boot: int = 10_000, alpha: float = 0.05, seed: int = 0
                 ) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over items of the mean of ``values``; deterministic for a seed."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return (float("nan"),) * 3
    mean = sum(vals) / n
    if n == 1:
        return mean, mean, mean
    import numpy as np

    arr = np.asarray(vals, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = arr[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)
