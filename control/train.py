"""One trainer for BC, filtered BC, SFT(Q), iw-SFT and iw-SFT(Q); the weighting is chosen by config.

Objective (all algorithms). A batch is a set of steps j, each from an episode e(j), with a per-episode weight w_e:

    L(θ) = − Σ_j w_e(j) · log π_θ(a_j | s_j) / Σ_j w_e(j)          (weights normalised over the batch)

With whole episodes in the batch this is the authors' padded formula Σ_i w_i Σ_t log π(a_it|s_it) / Σ_i w_i T_i
(tests/test_control_equivalence.py checks this against a naive padded implementation). The fast path samples
single steps: episodes are drawn with probability ∝ (sampling weight × length) and a step uniformly within each, so
the expected loss is the same. What varies by algorithm:

  bc           all episodes, w = 1, from scratch (this policy is also p_ref for the others)
  filtered_bc  top `filter_fraction` of episodes by return, w = 1, from the BC init
  sft_q        all episodes sampled ∝ percentile level (90/95/98th -> 1/2/3), w = 1, from the BC init
  iwsft        filtered episodes, w = clip(exp(temperature · mean_t[log q − log p_ref]), 0, 1000)
  iwsft_q      percentile-level sampling and importance weights

q is an EMA (decay 0.9, every step) of the trained policy and p_ref the frozen BC policy. log p_ref is cached once
per step of the data; the per-episode log-ratios are refreshed every `refresh_every` steps over all training episodes
(1 = exact). The weight formula, EMA, percentile levels and normalisation come from the `iwsft` core.

Exact mode (`full_episodes > 0, refresh_every = 1`) does only the work the loss needs, with the same loss and gradient:
q changes every step, so its log-ratios are recomputed only for the batch's episodes; and a batch drawn with
replacement (256 episodes out of ~95 for iw-SFT) repeats most steps, so the policy runs once per distinct step and
each result is copied to every draw (its gradient is then summed over the draws, exactly as if recomputed).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from iwsft import (EMA, WeightingConfig, level_sampling_probs, normalize_log_weights, offsets_to_segment_ids,
                   percentile_levels, sequence_log_ratio, sequence_log_weights, top_fraction_mask, weight_stats)
from control.episodes import Episodes
from control.evaluate import evaluate
from control.policy import GaussianPolicy, NumpyPolicy

ALGOS = ("bc", "filtered_bc", "sft_q", "iwsft", "iwsft_q")
CHUNK = 4096  # rows per forward/backward chunk (and per no-grad log-prob chunk, see GaussianPolicy.log_prob_chunked)


@dataclass
class TrainConfig:
    algo: str = "iwsft"  # one of ALGOS
    seed: int = 0  # seeds torch, numpy sampling and evaluation environments
    steps: int = 2000  # gradient steps (authors: BC 10k, the rest 2k)
    batch_size: int = 512  # transitions per gradient step (fast path)
    full_episodes: int = 0  # >0: each batch is this many whole episodes instead (the authors' layout; slow, exact)
    lr: float = 4e-5  # Adam learning rate (authors: BC 1e-3, the rest 4e-5)
    warmup_steps: int = 300  # linear warmup steps, then cosine decay to 0 (0 warmup + cosine=False: constant lr)
    cosine: bool = True  # cosine decay after warmup (authors: yes for fine-tuning, constant for BC)
    hidden: int = 256  # hidden units per layer
    layers: int = 3  # hidden layers
    filter_fraction: float = 0.1  # filtered_bc / iwsft: keep this top fraction of episodes by return
    percentiles: tuple = (90, 95, 98)  # sft_q / iwsft_q: return percentiles giving levels 1/2/3
    temperature: float = 10.0  # iw: multiplies the mean per-step log-ratio before exp
    clip_min: float = 0.0  # iw: lower clip of the weight
    clip_max: float = 1000.0  # iw: upper clip of the weight
    ema_decay: float = 0.9  # iw: q <- decay * q + (1 - decay) * policy after every step
    refresh_every: int = 50  # iw: recompute per-episode log-ratios under q every N steps (1 = exact)
    eval_every: int = 500  # evaluate every N steps (0 = only at the end)
    eval_episodes: int = 5  # episodes per intermediate evaluation
    final_eval_episodes: int = 10  # episodes of the final evaluation (the reported score)
    log_every: int = 100  # record loss / weight statistics every N steps

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; choose from {ALGOS}")
        for name in ("steps", "batch_size", "refresh_every", "log_every", "eval_episodes", "final_eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1.")
        for name in ("full_episodes", "warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0 (0 turns it off).")

    @property
    def weighted(self) -> bool:
        return self.algo in ("iwsft", "iwsft_q")

    @property
    def weighting(self) -> WeightingConfig:
        return WeightingConfig.control(temperature=self.temperature, clip_min=self.clip_min, clip_max=self.clip_max)

    @classmethod
    def bc(cls, **kw) -> "TrainConfig":
        """The authors' BC stage: 10k steps, Adam 1e-3, constant learning rate."""
        return cls(**{**dict(algo="bc", steps=10_000, lr=1e-3, warmup_steps=0, cosine=False), **kw})


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if not cfg.cosine:
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class Trainer:
    """Holds the data (as torch tensors), the policy, q (EMA) and p_ref, and does one gradient step at a time."""

    def __init__(self, cfg: TrainConfig, data: Episodes, init: dict | None = None, ref: GaussianPolicy | None = None):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env = data.env
        # which episodes are trained on, and how often each is sampled
        returns = data.returns
        if cfg.algo in ("filtered_bc", "iwsft"):
            keep = top_fraction_mask(returns, cfg.filter_fraction).numpy()
            data, probs = data.select(keep), None
        elif cfg.algo in ("sft_q", "iwsft_q"):
            levels = percentile_levels(returns, cfg.percentiles).numpy()
            data = data.select(levels > 0)  # level 0 is never sampled
            probs = level_sampling_probs(levels[levels > 0]).numpy()
        else:
            probs = None
        self.data = data
        E = data.num_episodes
        self.episode_probs = np.full(E, 1.0 / E) if probs is None else probs
        lengths = data.lengths
        step_mass = self.episode_probs * lengths  # fast path: an episode is picked ∝ prob × length
        self.step_probs = step_mass / step_mass.sum()
        self.obs = torch.as_tensor(data.observations)
        self.act = torch.as_tensor(data.actions)
        self.offsets = data.offsets
        self.lengths = lengths
        self.step_episode = offsets_to_segment_ids(torch.as_tensor(data.offsets))  # [N] episode of each step
        self.episode_steps = [torch.arange(s, t) for s, t in zip(data.offsets[:-1], data.offsets[1:])]  # per step

        obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
        self.policy = GaussianPolicy(obs_dim, act_dim, cfg.hidden, cfg.layers)
        if init is not None:
            self.policy.load_state_dict(init)
        else:
            self.policy.set_obs_stats(data.observations)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        if cfg.weighted:
            if ref is None:
                raise ValueError(f"{cfg.algo} needs the BC policy as p_ref")
            self.ema = EMA(self.policy, cfg.ema_decay)
            self.logp_ref = ref.log_prob_chunked(self.obs, self.act)  # [N], p_ref is frozen: computed once
            self.log_ratio = torch.zeros(E)
            self.refresh()
        # exact mode: refresh only the batch's episodes (the others would be stale again before they are used)
        self.batch_refresh = cfg.weighted and cfg.full_episodes > 0 and cfg.refresh_every == 1

    # ---- importance weights
    @torch.no_grad()
    def refresh(self, episodes: torch.Tensor | None = None) -> None:
        """Per-episode mean log-ratio log q - log p_ref over every step of `episodes` (default: all of them)."""
        steps = slice(None) if episodes is None else torch.cat([self.episode_steps[e] for e in episodes.tolist()])
        logp_q = self.ema.module.log_prob_chunked(self.obs[steps], self.act[steps])
        log_ratio = sequence_log_ratio(logp_q, self.logp_ref[steps], segment_ids=self.step_episode[steps],
                                       num_segments=self.data.num_episodes)
        if episodes is None:
            self.log_ratio = log_ratio
        else:
            self.log_ratio[episodes] = log_ratio[episodes]

    def episode_log_weights(self) -> torch.Tensor:
        """Log of the raw (unnormalised, clipped) importance weight of every training episode (cached log-ratios)."""
        w = self.cfg.weighting
        return sequence_log_weights(self.log_ratio, w.temperature, w.clip_min, w.clip_max)

    def episode_weights(self) -> torch.Tensor:
        """Raw (unnormalised) importance weight of every training episode from the cached log-ratios."""
        return self.episode_log_weights().exp()

    # ---- batches
    def sample_batch(self) -> torch.Tensor:
        """Flat step indices of one batch."""
        cfg = self.cfg
        if cfg.full_episodes:
            eps = self.rng.choice(len(self.lengths), size=cfg.full_episodes, p=self.episode_probs)
            return torch.cat([self.episode_steps[e] for e in eps.tolist()])
        eps = self.rng.choice(len(self.lengths), size=cfg.batch_size, p=self.step_probs)
        within = (self.rng.random(cfg.batch_size) * self.lengths[eps]).astype(np.int64)
        return torch.as_tensor(self.offsets[eps] + within)

    def step_coefficients(self, idx: torch.Tensor, uniq: torch.Tensor, inverse: torch.Tensor):
        """(c, normalised per-step weights or None) such that loss = −Σ_u c_u · log π(a_u|s_u) over the distinct
        steps uniq (idx = uniq[inverse]): c_u sums w_j / len(idx) over the draws j of step u, so the loss is
        −mean_j w_j log π(a_j|s_j) over the batch, as before, with each distinct step computed once."""
        w = None
        if self.cfg.weighted:
            # mean 1 over the batch's steps; normalised in log space, so temperature 10 cannot underflow to 0
            w = normalize_log_weights(self.episode_log_weights()[self.step_episode[idx]])
        draws = torch.ones(len(idx)) if w is None else w
        return torch.zeros(len(uniq)).index_add_(0, inverse, draws) / len(idx), w

    def train_step(self, idx: torch.Tensor | None = None) -> dict:
        """One gradient step on the steps `idx` (sampled if None); returns loss, the batch and its weights."""
        cfg = self.cfg
        idx = self.sample_batch() if idx is None else idx
        # a batch drawn with replacement repeats steps (256 episodes from ~95): networks run once per distinct step
        uniq, inverse = torch.unique(idx, return_inverse=True)
        if cfg.weighted and self.step % cfg.refresh_every == 0 and self.step > 0:
            self.refresh(self.step_episode[uniq].unique() if self.batch_refresh else None)
        coef, w = self.step_coefficients(idx, uniq, inverse)
        self.opt.zero_grad(set_to_none=True)
        loss = 0.0
        # forward/backward in chunks of rows, accumulating gradients: the activations stay in cache (~1.5x faster on
        # CPU for whole-episode batches); same loss and gradient up to fp32 summation order
        for i in range(0, len(uniq), CHUNK):
            u = uniq[i:i + CHUNK]
            part = -(coef[i:i + CHUNK] * self.policy.log_prob(self.obs[u], self.act[u])).sum()
            part.backward()
            loss += part.item()
        self.opt.step()
        self.sched.step()
        if cfg.weighted:
            self.ema.update(self.policy)
        self.step += 1
        return {"loss": loss, "idx": idx, "weights": w}

    def weight_summary(self) -> dict:
        if not self.cfg.weighted:
            return {}
        if self.batch_refresh:
            self.refresh()  # the cache of episodes outside the last batches is stale in exact mode
        w = self.episode_weights()
        return weight_stats(w, clip_min=self.cfg.clip_min, clip_max=self.cfg.clip_max, log_ratio=self.log_ratio)

    def evaluate(self, episodes: int, seed: int) -> dict:
        return evaluate(NumpyPolicy(self.policy), self.env, episodes, seed)


def train(cfg: TrainConfig, data: Episodes, init: dict | None = None, ref: GaussianPolicy | None = None,
          progress=None) -> dict:
    """Runs one training job; returns the result dict (config, curve, final score, episode weights)."""
    torch.set_num_threads(1)
    t0 = time.time()
    tr = Trainer(cfg, data, init, ref)
    curve, losses = [], []
    for _ in range(cfg.steps):
        out = tr.train_step()
        losses.append(out["loss"])
        s = tr.step
        row = None
        if s % cfg.log_every == 0 or s == cfg.steps:
            row = {"step": s, "loss": float(np.mean(losses[-cfg.log_every:])), "lr": tr.sched.get_last_lr()[0],
                   **tr.weight_summary()}
        if cfg.eval_every and s % cfg.eval_every == 0 and s < cfg.steps:
            row = row or {"step": s, "loss": float(np.mean(losses[-cfg.log_every:]))}
            row["score"] = tr.evaluate(cfg.eval_episodes, seed=1000 + cfg.seed)["score_mean"]
        if row:
            curve.append(row)
        if progress is not None:
            progress.update(1)
            if row and "score" in row:
                progress.set_postfix(score=f"{row['score']:.1f}", loss=f"{row['loss']:.3f}")
    train_time = time.time() - t0
    final = tr.evaluate(cfg.final_eval_episodes, seed=cfg.seed)
    curve[-1]["score"] = final["score_mean"]
    if cfg.weighted:
        tr.refresh()
    return {
        "config": asdict(cfg), "final": final, "curve": curve, "train_time_s": train_time,
        "wall_time_s": time.time() - t0, "train_episodes": tr.data.num_episodes, "train_steps": tr.data.num_steps,
        "episode_weights": tr.episode_weights().tolist() if cfg.weighted else None,
        "episode_returns": tr.data.returns.tolist() if cfg.weighted else None,
        "state_dict": tr.policy.state_dict(),
    }


def policy_from_state(state: dict, hidden: int = 256, layers: int = 3) -> GaussianPolicy:
    obs_dim, act_dim = state["obs_mean"].shape[0], state["log_std"].shape[0]
    p = GaussianPolicy(obs_dim, act_dim, hidden, layers)
    p.load_state_dict(state)
    return p.eval().requires_grad_(False)
