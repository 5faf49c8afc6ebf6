"""The two-armed bandit as a test of the core: ``iwsft.importance_weights`` + ``iwsft.weighted_nll`` driving a
2-logit softmax policy ``p_θ = softmax(z)`` by full-batch gradient descent.

Setting. Actions ``L`` (left) and ``R`` (right); reward ``R(L) ~ Bernoulli(1/2)``, ``R(R) = 1``. The curated data
set ``D+`` holds the successes of ``p_ref`` in their exact expected proportions: with ``p_ref = (1/2, 1/2)`` the
successes are ``L`` with probability ``1/2 · 1/2`` and ``R`` with ``1/2``, i.e. ``n_L : n_R = 1 : 2`` (data: one
``L``, two ``R``); with ``p_ref(R) = 0.02`` they are ``0.98 · 1/2 : 0.02 = 49 : 2``.

Loss (what the recipe computes, one "token" per sequence): ``ℓ(z) = −Σ_i sg(w_i) log p_θ(a_i) / N`` with
``w_i = clip(p_θ(a_i) / p_ref(a_i), 0, 16)`` for iw-SFT (``q`` = the current policy, temperature 1, the mean
log-ratio of a one-token sequence is just ``log q − log p_ref``) and ``w_i ≡ 1`` for SFT. With
``c_a = Σ_{i: a_i = a} w_i`` the softmax gradient is ``∂ℓ/∂z = −(c − (Σ_a c_a) p_θ) / N``; a fixed point has
``p_θ = c / Σ c``. Write ``r = p_θ(R)`` and ``g = z_R − z_L``; then ``−N ∂ℓ/∂g = d(r) = c_R − c_L − Σc · (2r − 1)``.

1. SFT: ``c = (n_L, n_R)`` is constant, so ``p_θ → (n_L, n_R)/N``: ``p(L) = 1/3`` (and ``49/51`` for the skewed
   ``p_ref``).
2. iw-SFT, ``p_ref = (1/2, 1/2)``: ``w_L = 2(1 − r)``, ``w_R = 2r`` (never near the clip: ``w ≤ 2``), so
   ``c_L = 2(1 − r)``, ``c_R = 4r`` and ``d(r) = 4r − 2(1 − r) − (2 + 2r)(2r − 1) = 4r(1 − r) > 0`` on (0, 1):
   ``r`` rises monotonically and ``p(R) → 1``. At ``z = 0`` the gradient is ``∂ℓ/∂z = −((1, 2) − 3·(1/2, 1/2))/3
   = (1/6, −1/6)``.
3. iw-SFT, ``p_ref(R) = 0.02`` (``N = 51``): ``w_L = (1 − r)/0.98``, ``w_R = min(r/0.02, 16)``. Unclipped,
   ``c = (50(1 − r), 100 r)`` and ``d = 100 r (1 − r) > 0``: ``r → 1``. The clip binds once ``r > 0.32``; then
   ``c_R = 32`` and ``d = 32 − 50(1 − r) − (82 − 50 r)(2r − 1) = 4 (25 r − 16)(r − 1)``, positive below and
   negative above ``r = 16/25``: iw-SFT with the authors' clip at 16 converges to ``p(R) = 16/25 = 0.64`` exactly,
   with the ``R`` weights sitting at the clip (a share ``2/51`` of all weights) — without the clip it goes to 1.
"""

import pytest
import torch

import iwsft

L, R = 0, 1


def policy_run(actions, p_ref, method, clip_max=16.0, steps=3000, lr=1.0, record=None):
    """Full-batch gradient descent on ``z`` (float64) with the core's weights and loss; returns ``softmax(z)``."""
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(actions)
    log_ref = torch.log(torch.tensor(p_ref, dtype=torch.float64))[a].unsqueeze(1)  # [N, 1]
    mask = torch.ones(len(actions), 1, dtype=torch.bool)
    cfg = iwsft.WeightingConfig.llm(clip_max=clip_max)
    for _ in range(steps):
        logp = torch.log_softmax(z, 0)[a].unsqueeze(1)  # [N, 1]: one-token "sequences"
        w = None
        if method == "iwsft":
            w, _ = iwsft.importance_weights(logp.detach(), log_ref, cfg, mask=mask)  # [N]
        loss_sum, n = iwsft.weighted_nll(logp, mask, seq_weights=w)
        loss = loss_sum / n
        z.grad = None
        loss.backward()
        if record is not None:
            record.append((torch.softmax(z.detach(), 0).clone(), z.grad.clone(), None if w is None else w.clone()))
        with torch.no_grad():
            z -= lr * z.grad
    return torch.softmax(z.detach(), 0)


EVEN = [L, R, R]  # successes of p_ref = (1/2, 1/2): 1 : 2
SKEWED = [L] * 49 + [R] * 2  # successes of p_ref = (0.98, 0.02): 49 : 2


def test_sft_converges_to_the_success_proportions():
    p = policy_run(EVEN, (0.5, 0.5), "sft", steps=400)
    assert p[L].item() == pytest.approx(1 / 3, abs=1e-9)
    p = policy_run(SKEWED, (0.98, 0.02), "sft", steps=2000)
    assert p[L].item() == pytest.approx(49 / 51, abs=1e-8)


def test_iwsft_first_gradient_and_gap_rate_match_the_derivation():
    rec = []
    policy_run(EVEN, (0.5, 0.5), "iwsft", steps=1, record=rec)
    _, grad, w = rec[0]
    assert torch.allclose(w, torch.ones(3, dtype=w.dtype))  # q = p_ref at the start: every weight is 1
    assert torch.allclose(grad, torch.tensor([1 / 6, -1 / 6], dtype=torch.float64), atol=1e-7)
    rec = []
    policy_run(EVEN, (0.5, 0.5), "iwsft", steps=60, lr=0.5, record=rec)
    for p, grad, w in rec:
        r = p[R].item()
        # -N ∂ℓ/∂(z_R - z_L) = 4 r (1 - r); the two logit gradients are ± half of the gap's
        assert (grad[L] - grad[R]).item() == pytest.approx(4 * r * (1 - r) / 3, rel=1e-5)
        assert w.max().item() <= 2.0 + 1e-6  # w = 2 p_θ(a): the clip at 16 never binds here


def test_iwsft_goes_to_the_always_succeeding_arm():
    rec = []
    p = policy_run(EVEN, (0.5, 0.5), "iwsft", steps=3000, record=rec)
    rs = [x[0][R].item() for x in rec]
    assert all(b > a for a, b in zip(rs, rs[1:]))  # monotone, since d(r) = 4 r (1 - r) > 0
    # d(1-r)/dt ≈ -(4/3)(1-r)^2 near r = 1, so 1 - r ≈ 3/(4t): after 3000 steps about 2.5e-4
    assert p[R].item() > 0.999
    sft = policy_run(EVEN, (0.5, 0.5), "sft", steps=400)
    assert p[R].item() > sft[R].item() + 0.3  # SFT stops at 2/3


def test_the_clip_at_16_binds_and_stops_iwsft_at_16_over_25():
    rec = []
    p = policy_run(SKEWED, (0.98, 0.02), "iwsft", steps=3000, record=rec)
    assert p[R].item() == pytest.approx(16 / 25, abs=1e-5)
    w = rec[-1][2]
    assert torch.allclose(w[49:], torch.full((2,), 16.0, dtype=w.dtype))  # the R weights sit at the clip
    assert w[0].item() == pytest.approx((9 / 25) / 0.98, rel=1e-5)  # w_L = p_θ(L) / p_ref(L)
    stats = iwsft.weight_stats(w, clip_max=16.0)
    assert stats["weight_clip_hi"] == pytest.approx(2 / 51)
    unclipped = policy_run(SKEWED, (0.98, 0.02), "iwsft", clip_max=1e6, steps=3000)
    assert unclipped[R].item() > 0.99  # d = 100 r (1 - r) > 0 without the clip
    sft = policy_run(SKEWED, (0.98, 0.02), "sft", steps=2000)
    assert sft[R].item() == pytest.approx(2 / 51, abs=1e-6)
