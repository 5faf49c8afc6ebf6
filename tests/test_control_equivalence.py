"""The control trainer against the authors' objective, written out independently here (REFERENCE.md section 1):

    BC      L = −mean_i[ Σ_t log π(a_it|s_it) / T_i ]
    iw-SFT  L = −mean_i[ (w_i / Σ_j w_j) · Σ_t log π(a_it|s_it) / T_i ],
            w_i = clip(exp(temperature · (Σ_t log q − Σ_t log p_ref) / T_i), 0, clip_max)

computed with a plain Python loop over the episodes of a batch (no padding, no segment sums, no shared code with the
trainer). The trainer's exact mode must give the same loss (times B, the documented constant factor) and gradients;
its sampled mode must be unbiased for the same objective (given its virtual batch of B episodes); the per-step
reduction is checked against the padded formula Σ_i w_i Σ_t log π / Σ_i w_i T_i.
"""
import copy
import math

import numpy as np
import pytest
import torch

from control.episodes import Episodes
from control.train import TrainConfig, Trainer


def tiny_episodes(seed=0, n=12, obs_dim=4, act_dim=2, lo=3, hi=25):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=n)
    N = int(lengths.sum())
    return Episodes(rng.normal(size=(N, obs_dim)), np.tanh(rng.normal(size=(N, act_dim))), rng.normal(size=N),
                    np.concatenate([[0], np.cumsum(lengths)]), rng.random(n) < 0.5, env="hopper", source="tiny")


def logp_by_hand(policy, obs, act):
    """log N(a; mu, sigma) summed over action dims, written out by hand: [T]."""
    mean, log_std = policy(obs)
    var = torch.exp(2 * log_std)
    return (-((act - mean) ** 2) / (2 * var) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def episode(data, e):
    s, t = data.offsets[e], data.offsets[e + 1]
    return torch.as_tensor(data.observations[s:t]), torch.as_tensor(data.actions[s:t])


def authors_weight(q, ref, data, e, temperature, clip_max):
    o, a = episode(data, e)
    with torch.no_grad():
        lr = (logp_by_hand(q, o, a).sum() - logp_by_hand(ref, o, a).sum()) / len(o)
        return min(max(math.exp(temperature * lr.item()), 0.0), clip_max)


def authors_loss(policy, q, ref, data, episodes, weighted, temperature=10.0, clip_max=1000.0):
    """The authors' per-episode loss, one episode at a time (REFERENCE.md section 1)."""
    w = [authors_weight(q, ref, data, e, temperature, clip_max) if weighted else 1.0 for e in episodes]
    total = sum(w)
    terms = []
    for e, wi in zip(episodes, w):
        o, a = episode(data, e)
        ell = logp_by_hand(policy, o, a).sum() / len(o)  # Σ_t log π / T_i
        terms.append((wi / total if weighted else 1.0) * ell)
    return -torch.stack(terms).mean(), torch.tensor(w)


def padded_step_loss(policy, q, ref, data, episodes, temperature=10.0, clip_max=1000.0):
    """The per-step reduction: Σ_i w_i Σ_t log π / Σ_i w_i T_i (an episode counts ∝ w_i · T_i)."""
    num, den = 0.0, 0.0
    for e in episodes:
        o, a = episode(data, e)
        wi = authors_weight(q, ref, data, e, temperature, clip_max)
        num = num + wi * logp_by_hand(policy, o, a).sum()
        den += wi * len(o)
    return -num / den


def make_policies(data, hidden=32):
    init_policy = Trainer(TrainConfig(algo="bc", hidden=hidden, layers=3, seed=1), data).policy
    ref = Trainer(TrainConfig(algo="bc", hidden=hidden, layers=3, seed=2), data).policy.eval().requires_grad_(False)
    with torch.no_grad():
        ref.log_std.fill_(-0.5)  # p_ref far from the init, so that the weights spread (and some hit the clip)
    return init_policy, ref


@pytest.mark.parametrize("algo,chunk", [("iwsft", 4096), ("iwsft_q", 4096), ("iwsft_q", 7), ("bc", 4096),
                                        ("filtered_bc", 4096), ("sft_q", 4096)])
def test_exact_mode_equals_authors_episode_loss(algo, chunk, monkeypatch):
    # chunk=7: the forward/backward runs in many small chunks of distinct steps, gradients accumulated across them
    monkeypatch.setattr("control.train.CHUNK", chunk)
    torch.manual_seed(0)
    data = tiny_episodes()
    B = 5
    cfg = TrainConfig(algo=algo, steps=6, full_episodes=B, refresh_every=1, lr=3e-3, warmup_steps=0, cosine=False,
                      hidden=32, layers=3, filter_fraction=0.5, percentiles=(20, 50, 80), temperature=10.0,
                      clip_max=2.0, eval_every=0)
    assert cfg.reduction == "episode"  # the default
    init_policy, ref = make_policies(data)
    weighted = algo.startswith("iwsft")
    tr = Trainer(cfg, data, init=copy.deepcopy(init_policy.state_dict()), ref=ref if weighted else None)
    saw_clip = repeated = False
    for _ in range(cfg.steps):
        batch = tr.sample_batch()
        eps = batch["episodes"].tolist()
        repeated |= len(set(eps)) < len(eps)
        q = copy.deepcopy(tr.ema.module) if weighted else None
        loss, w = authors_loss(tr.policy, q, ref, tr.data, eps, weighted, cfg.temperature, cfg.clip_max)
        tr.policy.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in tr.policy.parameters()]
        out = tr.train_step(batch)  # refreshes the weights of the batch's episodes under the current q itself
        # iw: our loss is B × the authors' (their mean over episodes of w_i/Σw carries a 1/B that Adam ignores);
        # without weights it is the authors' BC loss itself
        k = B if weighted else 1
        assert out["loss"] == pytest.approx(k * loss.item(), rel=1e-5, abs=1e-5)
        for g_ours, g_authors in zip([p.grad for p in tr.policy.parameters()], grads):
            torch.testing.assert_close(g_ours, k * g_authors, rtol=1e-4, atol=1e-5)
        if weighted:
            torch.testing.assert_close(tr.episode_weights()[eps], w.float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["weights"], (w * B / w.sum()).float(), rtol=1e-5, atol=1e-6)
            saw_clip |= bool((w >= cfg.clip_max).any())
            assert w.std() > 0  # weights are not trivially uniform
    assert repeated, "the test should draw some episode twice in a batch (steps computed once, counted twice)"
    if weighted:
        assert saw_clip, "the test should exercise the upper clip"


def test_episode_reduction_differs_from_step_reduction():
    """BC's two reductions give different gradient directions when episode lengths differ (not a constant factor),
    and the trainer's `reduction` option picks each of them."""
    data = tiny_episodes(5, lo=2, hi=60)
    init_policy, _ = make_policies(data)
    eps = list(range(data.num_episodes))

    def per_step(p):  # −Σ_i Σ_t log π / Σ_i T_i
        return -sum(logp_by_hand(p, *episode(data, e)).sum() for e in eps) / float(data.num_steps)

    grads = []
    for fn in (lambda p: authors_loss(p, None, None, data, eps, False)[0], per_step):
        p = copy.deepcopy(init_policy)
        fn(p).backward()
        grads.append(torch.cat([x.grad.reshape(-1) for x in p.parameters()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos < 0.999  # not parallel: the reductions differ by more than a constant factor
    for reduction, g_ref in zip(("episode", "step"), grads):
        tr = Trainer(TrainConfig(algo="bc", hidden=32, full_episodes=len(eps), reduction=reduction, eval_every=0),
                     data, init=copy.deepcopy(init_policy.state_dict()))
        batch = {"idx": torch.arange(data.num_steps), "episodes": torch.as_tensor(eps),
                 "draw": torch.repeat_interleave(torch.arange(len(eps)), torch.as_tensor(data.lengths))}
        tr.train_step(batch)
        g = torch.cat([x.grad.reshape(-1) for x in tr.policy.parameters()])
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_exact_mode_step_reduction_equals_padded_formula():
    data = tiny_episodes(3)
    cfg = TrainConfig(algo="iwsft", steps=3, full_episodes=4, refresh_every=1, reduction="step", lr=3e-3,
                      warmup_steps=0, cosine=False, hidden=32, filter_fraction=0.5, clip_max=2.0, eval_every=0)
    init_policy, ref = make_policies(data)
    tr = Trainer(cfg, data, init=copy.deepcopy(init_policy.state_dict()), ref=ref)
    for _ in range(cfg.steps):
        batch = tr.sample_batch()
        q = copy.deepcopy(tr.ema.module)
        loss = padded_step_loss(tr.policy, q, ref, tr.data, batch["episodes"].tolist(), 10.0, 2.0)
        tr.policy.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in tr.policy.parameters()]
        assert tr.train_step(batch)["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for g, g_ref in zip([p.grad for p in tr.policy.parameters()], grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def expected_sampled_loss(policy, data, episode_probs):
    """Σ_e P(e) · mean_t(−log π) over episode e: the expectation of −mean_j log π(a_j|s_j) when each step's episode is
    drawn with probability P(e) and the step uniformly within it."""
    total = 0.0
    for e, pe in episode_probs.items():
        o, a = episode(data, e)
        total = total - pe * logp_by_hand(policy, o, a).mean()
    return total


def assert_draws_follow(draw, probs, batches=300):
    """Counts of `draw()` (episode ids) over many batches within 5 binomial sigmas of `probs` {episode: P}."""
    counts = {}
    for _ in range(batches):
        for e in draw().tolist():
            counts[e] = counts.get(e, 0) + 1
    n = sum(counts.values())
    assert set(counts) <= set(probs)
    for e, pe in probs.items():
        assert abs(counts.get(e, 0) - n * pe) <= 5 * math.sqrt(n * pe * (1 - pe)) + 1, (e, counts.get(e), n * pe)


def test_sampled_mode_is_unbiased_for_the_authors_batch_loss():
    """iw-SFT(Q), sampled mode: given its virtual batch of B episodes (drawn ∝ percentile level, as the authors draw
    their batch), the expected loss and gradient of the sampled steps equal B × the authors' loss on that batch,
    computed by hand; and the steps are drawn with those probabilities."""
    data = tiny_episodes(4, n=20, lo=2, hi=40)
    B = 12
    cfg = TrainConfig(algo="iwsft_q", hidden=32, percentiles=(20, 50, 80), eval_every=0, batch_size=64,
                      virtual_episodes=B)
    init_policy, ref = make_policies(data)
    tr = Trainer(cfg, data, init=copy.deepcopy(init_policy.state_dict()), ref=ref)
    # the percentile levels by hand: 1/2/3 at the 20/50/80th return percentiles (numpy's linear percentiles)
    returns = data.returns
    levels = (returns[:, None] >= np.percentile(returns, [20, 50, 80])[None]).sum(1)
    kept = np.flatnonzero(levels > 0)
    assert tr.data.num_episodes == len(kept)
    np.testing.assert_allclose(tr.episode_probs, levels[kept] / levels[kept].sum())
    virtual = tr.sample_batch()["virtual"]
    assert len(virtual) == B
    loss, w = authors_loss(tr.policy, tr.ema.module, ref, tr.data, virtual.tolist(), True, 10.0, 1000.0)
    assert w.max() / w.min() > 10  # the weights matter
    draw = tr.virtual_draw_probs(virtual)
    np.testing.assert_allclose(draw, (w / w.sum()).numpy(), rtol=1e-5)
    probs = {}
    for e, pd in zip(virtual.tolist(), draw):
        probs[e] = probs.get(e, 0.0) + pd
    expected = expected_sampled_loss(tr.policy, tr.data, probs)
    assert expected.item() == pytest.approx(B * loss.item(), rel=1e-5)
    for g1, g2 in zip(torch.autograd.grad(B * loss, list(tr.policy.parameters())),
                      torch.autograd.grad(expected, list(tr.policy.parameters()))):
        torch.testing.assert_close(g1, g2.float(), rtol=1e-4, atol=1e-6)
    assert_draws_follow(lambda: tr.sample_steps(virtual)["episodes"], probs)


def test_sampled_bc_is_unbiased_for_the_authors_bc_loss():
    """BC, sampled mode: episodes drawn uniformly, a step uniformly within: the expectation is −mean_i ℓ_i over the
    whole data set, the authors' BC loss in expectation over their batches."""
    data = tiny_episodes(4, n=20, lo=2, hi=40)
    tr = Trainer(TrainConfig(algo="bc", hidden=32, eval_every=0, batch_size=64), data)
    eps = list(range(data.num_episodes))
    target = authors_loss(tr.policy, None, None, data, eps, False)[0]
    probs = dict(zip(eps, tr.draw_probs()))
    np.testing.assert_allclose(list(probs.values()), 1 / len(eps))
    expected = expected_sampled_loss(tr.policy, data, probs)
    assert expected.item() == pytest.approx(target.item(), rel=1e-5)
    assert_draws_follow(lambda: tr.sample_batch()["episodes"], probs)


def test_cached_refresh_is_stale_between_refreshes():
    """With refresh_every > 1 the log-ratios are only recomputed every N steps (a named approximation)."""
    data = tiny_episodes(1)
    base = Trainer(TrainConfig(algo="bc", hidden=16, seed=3), data)
    cfg = TrainConfig(algo="iwsft", steps=4, batch_size=16, refresh_every=3, lr=1e-2, warmup_steps=0, cosine=False,
                      hidden=16, filter_fraction=0.5, eval_every=0)
    tr = Trainer(cfg, data, init=copy.deepcopy(base.policy.state_dict()), ref=base.policy.eval())
    r0 = tr.log_ratio.clone()
    tr.train_step(), tr.train_step()
    torch.testing.assert_close(tr.log_ratio, r0)  # steps 1, 2: cache not refreshed
    tr.train_step()
    tr.train_step()  # refresh happened at the start of step 3
    assert not torch.allclose(tr.log_ratio, r0)


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction='mean'.*'episode'"):
        TrainConfig(reduction="mean")
