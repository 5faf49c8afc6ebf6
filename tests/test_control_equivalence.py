"""The fast trainer (flat steps, segment reductions, cached log-ratios) equals a naive padded implementation of the
authors' iw-SFT control loss when the batch holds whole episodes and the cache is refreshed every step."""
import copy
import math

import numpy as np
import pytest
import torch

from control.episodes import Episodes
from control.train import TrainConfig, Trainer


def tiny_episodes(seed=0, n=12, obs_dim=4, act_dim=2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 25, size=n)
    N = int(lengths.sum())
    return Episodes(rng.normal(size=(N, obs_dim)), np.tanh(rng.normal(size=(N, act_dim))), rng.normal(size=N),
                    np.concatenate([[0], np.cumsum(lengths)]), rng.random(n) < 0.5, env="hopper", source="tiny")


def naive_gaussian_logp(policy, obs, act):
    """log N(a; mu, sigma) summed over action dims, written out by hand: [B, T]."""
    mean, log_std = policy(obs)
    var = torch.exp(2 * log_std)
    return (-((act - mean) ** 2) / (2 * var) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def naive_padded(policy, q, ref, data, episodes, temperature, clip_max):
    """Authors' formula on a padded [B, T] batch of whole episodes.

    log_ratio_i = (sum_t log q - sum_t log p_ref) / T_i ;  w_i = clip(exp(temperature * log_ratio_i), 0, clip_max)
    loss = - sum_i w_i * sum_t log pi(a_it | s_it) / sum_i w_i * T_i   (weights self-normalised over the batch)
    """
    B = len(episodes)
    lengths = [int(data.offsets[e + 1] - data.offsets[e]) for e in episodes]
    T = max(lengths)
    obs = torch.zeros(B, T, data.observations.shape[1])
    act = torch.zeros(B, T, data.actions.shape[1])
    mask = torch.zeros(B, T)
    for i, e in enumerate(episodes):
        s, t = data.offsets[e], data.offsets[e + 1]
        obs[i, : t - s] = torch.as_tensor(data.observations[s:t])
        act[i, : t - s] = torch.as_tensor(data.actions[s:t])
        mask[i, : t - s] = 1
    with torch.no_grad():
        lq = (naive_gaussian_logp(q, obs, act) * mask).sum(1)
        lr = (naive_gaussian_logp(ref, obs, act) * mask).sum(1)
        log_ratio = (lq - lr) / mask.sum(1)
        w = torch.clamp(torch.exp(temperature * log_ratio), 0.0, clip_max)
    logp = naive_gaussian_logp(policy, obs, act) * mask
    loss = -(w * logp.sum(1)).sum() / (w * mask.sum(1)).sum()
    return loss, w


def split_episodes(idx, offsets):
    """Episode indices of a whole-episode batch, in order (a new episode starts at each start offset)."""
    starts = {int(o): e for e, o in enumerate(offsets[:-1])}
    return [starts[int(j)] for j in idx if int(j) in starts]


@pytest.mark.parametrize("algo,chunk", [("iwsft", 4096), ("iwsft_q", 4096), ("iwsft_q", 7)])
def test_fast_trainer_equals_naive_padded(algo, chunk, monkeypatch):
    # chunk=7: the forward/backward runs in many small chunks of distinct steps, gradients accumulated across them
    monkeypatch.setattr("control.train.CHUNK", chunk)
    torch.manual_seed(0)
    data = tiny_episodes()
    cfg = TrainConfig(algo=algo, steps=6, full_episodes=5, refresh_every=1, lr=3e-3, warmup_steps=0, cosine=False,
                      hidden=32, layers=3, filter_fraction=0.5, percentiles=(20, 50, 80), temperature=10.0,
                      clip_max=2.0, eval_every=0)
    # p_ref: a different random policy, so that weights are far from 1 (and some hit the clip)
    init_policy = Trainer(TrainConfig(algo="bc", hidden=32, layers=3, seed=1), data).policy
    ref = Trainer(TrainConfig(algo="bc", hidden=32, layers=3, seed=2), data).policy.eval().requires_grad_(False)
    with torch.no_grad():
        ref.log_std.fill_(-0.5)
    tr = Trainer(cfg, data, init=copy.deepcopy(init_policy.state_dict()), ref=ref)
    saw_clip = repeated = False
    for _ in range(cfg.steps):
        # no explicit refresh: train_step itself must refresh the log-ratios under the current q (refresh_every=1)
        idx = tr.sample_batch()
        eps = split_episodes(idx, tr.data.offsets)
        assert sum(int(tr.lengths[e]) for e in eps) == len(idx)
        repeated |= len(set(eps)) < len(eps)
        q = copy.deepcopy(tr.ema.module)
        naive_loss, naive_w = naive_padded(tr.policy, q, ref, tr.data, eps, cfg.temperature, cfg.clip_max)
        tr.policy.zero_grad()
        naive_loss.backward()
        naive_grads = [p.grad.clone() for p in tr.policy.parameters()]
        out = tr.train_step(idx)
        # loss and gradients
        assert out["loss"] == pytest.approx(naive_loss.item(), rel=1e-5, abs=1e-5)
        for g_fast, g_naive in zip([p.grad for p in tr.policy.parameters()], naive_grads):
            torch.testing.assert_close(g_fast, g_naive, rtol=1e-4, atol=1e-5)
        # raw per-episode weights, and the normalised per-step weights the loss used
        fast_raw = tr.episode_weights()  # refreshed before the step, unchanged by it (cache)
        torch.testing.assert_close(fast_raw[eps], naive_w, rtol=1e-5, atol=1e-5)
        lengths = torch.tensor([float(tr.lengths[e]) for e in eps])
        expected_step_w = torch.repeat_interleave(naive_w, lengths.long()) * len(idx) / (naive_w * lengths).sum()
        torch.testing.assert_close(out["weights"], expected_step_w, rtol=1e-5, atol=1e-5)
        saw_clip |= bool((naive_w >= cfg.clip_max).any())
        assert naive_w.std() > 0  # weights are not trivially uniform
    assert tr.step == cfg.steps
    assert saw_clip, "the test should exercise the upper clip"
    assert repeated, "the test should draw some episode twice in a batch (steps computed once, counted twice)"


def test_cached_refresh_is_stale_between_refreshes():
    """With refresh_every > 1 the log-ratios are only recomputed every N steps (the documented approximation)."""
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


def test_bc_loss_is_mean_step_nll():
    """BC on a whole-episode batch is the plain mean negative log-likelihood of the steps."""
    data = tiny_episodes(2)
    tr = Trainer(TrainConfig(algo="bc", hidden=16, full_episodes=3, eval_every=0), data)
    idx = tr.sample_batch()
    obs, act = torch.as_tensor(data.observations[idx.numpy()]), torch.as_tensor(data.actions[idx.numpy()])
    with torch.no_grad():
        expected = -naive_gaussian_logp(tr.policy, obs, act).mean()
    assert tr.train_step(idx)["loss"] == pytest.approx(expected.item(), rel=1e-6)
