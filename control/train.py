"""One trainer for BC, filtered BC, SFT(Q), iw-SFT and iw-SFT(Q); the weighting is chosen by config.

Objective: the authors' reduction (REFERENCE.md section 1), `reduction="episode"`, the default for every algorithm.
For a batch of B episodes i (drawn with probability p_i: uniform, or ∝ percentile level for the (Q) variants) with
per-step log-likelihoods log π(a_it|s_it) and ℓ_i = Σ_t log π(a_it|s_it) / T_i (a mean within each episode):

    BC / filtered BC / SFT(Q)   L_authors = −mean_i[ ℓ_i ]
    iw-SFT / iw-SFT(Q)          L_authors = −mean_i[ (w_i / Σ_j w_j) · ℓ_i ],
                                w_i = clip(exp(temperature · (Σ_t log q − Σ_t log p_ref) / T_i), 0, 1000)

so every episode counts ∝ w_i whatever its length T_i. The trainer minimises L = −Σ_i ŵ_i ℓ_i / B with ŵ_i = B·w_i/Σ_j w_j
(mean 1, the core's `normalize_log_weights`): for iw-SFT L = B · L_authors, a constant factor that Adam's update
ignores (up to its eps), and it keeps the loss on BC's scale. `reduction="step"` is the per-step alternative
L = −Σ_i ŵ_i Σ_t log π / Σ_i ŵ_i T_i (an episode counts ∝ w_i·T_i; what this trainer did before).

Two ways to form a batch (`full_episodes`):
  exact    (full_episodes = B > 0) B whole episodes drawn ∝ p_i, the loss above; with refresh_every = 1 the weights
           are recomputed every step from the current q (the authors' layout; tests/test_control_equivalence.py).
  sampled  (full_episodes = 0, default) first a *virtual* batch of `virtual_episodes` episodes drawn ∝ p_i exactly
           as the authors draw theirs (B = 256; BC 128), then `batch_size` single steps: a draw d of that batch
           with probability w_d / Σ_batch w (· T_d / ... for reduction="step"), then a step uniformly within its
           episode; loss −mean_j log π(a_j|s_j). Given the virtual batch, its expectation is the authors' loss on
           that batch (× B), so the gradient is unbiased for the authors' objective including its self-normalisation
           over B episodes (which matters: with w concentrated on few episodes, a batch that misses them spreads its
           weight over the others). Unweighted algorithms reduce to drawing episodes ∝ p_i. q's log-ratios over all
           training episodes are refreshed every `refresh_every` steps (default 1: the draws use them, so stale
           weights change what is trained on; tests/test_control_dynamics.py).

What varies by algorithm:
  bc           all episodes, w = 1, from scratch (this policy is also p_ref for the others)
  filtered_bc  top `filter_fraction` of episodes by return, w = 1, from the BC init
  sft_q        all episodes sampled ∝ percentile level (90/95/98th -> 1/2/3), w = 1, from the BC init
  iwsft        filtered episodes, importance weights w_i
  iwsft_q      percentile-level sampling and importance weights

q is an EMA (decay 0.9, every step) of the trained policy and p_ref the frozen BC policy (log p_ref cached once).
The weight formula, EMA, percentile levels and normalisation come from the `iwsft` core.

Exact mode does only the work the loss needs, with the same loss and gradient: q's log-ratios are recomputed only
for the batch's episodes; and a batch drawn with replacement (256 episodes out of ~95 for iw-SFT) repeats most steps,
so the policy runs once per distinct step with the summed coefficient of its draws.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from iwsft import (EMA, WeightingConfig, level_sampling_probs, normalize_log_weights, offsets_to_segment_ids,
                   percentile_levels, sequence_log_ratio, sequence_log_weights, top_fraction_mask, weight_stats)
from control.envs import check_shapes, describe_env, get_env, versions
from control.episodes import Episodes
from control.evaluate import evaluate
from control.policy import GaussianPolicy, NumpyPolicy

ALGOS = ("bc", "filtered_bc", "sft_q", "iwsft", "iwsft_q")
REDUCTIONS = ("episode", "step")
CHUNK = 4096  # rows per forward/backward chunk (and per no-grad log-prob chunk, see GaussianPolicy.log_prob_chunked)


@dataclass
class TrainConfig:
    algo: str = "iwsft"  # one of ALGOS
    seed: int = 0  # seeds torch, numpy sampling and evaluation environments
    steps: int = 2000  # gradient steps (authors: BC 10k, the rest 2k)
    reduction: str = "episode"  # "episode": the authors' (mean within each episode, episodes ∝ w); "step": ∝ w·T
    batch_size: int = 512  # sampled mode: transitions per gradient step
    virtual_episodes: int = 256  # sampled mode: episodes of the authors' batch the steps are drawn from (BC: 128)
    full_episodes: int = 0  # >0: exact mode, each batch is this many whole episodes (the authors' layout, slow)
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
    refresh_every: int = 1  # iw: recompute the per-episode log-ratios under q every N steps (1 = every step, exact)
    eval_every: int = 500  # evaluate every N steps (0 = only at the end)
    eval_episodes: int = 5  # episodes per intermediate evaluation
    final_eval_episodes: int = 100  # episodes of the final evaluation (the reported score; authors: 100)
    log_every: int = 100  # record loss / weight statistics every N steps

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; choose from {ALGOS}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"TrainConfig.reduction={self.reduction!r} is not one of {REDUCTIONS}; 'episode' is the "
                             "authors' (an episode counts ∝ its weight), 'step' counts it ∝ weight × length.")
        for name in ("steps", "batch_size", "virtual_episodes", "refresh_every", "log_every", "eval_episodes", "final_eval_episodes"):
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
        """The authors' BC stage: 10k steps, Adam 1e-3, constant learning rate, batches of 128 episodes."""
        return cls(**{**dict(algo="bc", steps=10_000, lr=1e-3, warmup_steps=0, cosine=False, virtual_episodes=128),
                      **kw})


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if not cfg.cosine:
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def state_hash(state: dict) -> str:
    """sha256 (first 16 hex digits) of a state dict's tensors, by name: identifies p_ref / the initialisation."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class Trainer:
    """Holds the data (as torch tensors), the policy, q (EMA) and p_ref, and does one gradient step at a time."""

    def __init__(self, cfg: TrainConfig, data: Episodes, init: dict | None = None, ref: GaussianPolicy | None = None):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env = data.env
        self.eval_env = data.eval_env
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
        self.episode_probs = np.full(E, 1.0 / E) if probs is None else probs  # p_i [E]
        lengths = data.lengths
        # sampled mode: log of the draw probability before the weights, log p_i (+ log T_i for the per-step reduction)
        self.log_draw_base = torch.as_tensor(np.log(self.episode_probs), dtype=torch.float64)
        if cfg.reduction == "step":
            self.log_draw_base = self.log_draw_base + torch.as_tensor(np.log(lengths), dtype=torch.float64)
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
        # exact mode with refresh every step: refresh only the batch's episodes (the others would be stale again
        # before they are used; weight_summary refreshes all of them for logging)
        self.batch_refresh = cfg.weighted and cfg.full_episodes > 0 and cfg.refresh_every == 1
        if cfg.weighted:
            if ref is None:
                raise ValueError(f"{cfg.algo} needs the BC policy as p_ref")
            self.ema = EMA(self.policy, cfg.ema_decay)
            self.logp_ref = ref.log_prob_chunked(self.obs, self.act)  # [N], p_ref is frozen: computed once
            self.log_ratio = torch.zeros(E)
            self.refresh()

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
    def draw_probs(self) -> np.ndarray:
        """Sampled mode, unweighted: probability of drawing each episode [E], ∝ p_i (· T_i for reduction="step")."""
        return torch.softmax(self.log_draw_base, 0).numpy()

    def virtual_draw_probs(self, virtual: np.ndarray) -> np.ndarray:
        """Sampled mode, weighted: probability of each draw d of the virtual batch `virtual` [B] (episode ids),
        w_d / Σ_batch w (· T_d for reduction="step", renormalised); in log space, so weights of exp(-80)
        (temperature 10) never underflow the whole distribution to 0."""
        logits = self.episode_log_weights()[torch.as_tensor(virtual)].double()
        if self.cfg.reduction == "step":
            logits = logits + torch.as_tensor(np.log(self.lengths[virtual]), dtype=torch.float64)
        return torch.softmax(logits, 0).numpy()

    def sample_steps(self, virtual: np.ndarray | None) -> dict:
        """`batch_size` steps: an episode (from the virtual batch ∝ its weight, else ∝ draw_probs), then a step
        uniformly within it."""
        M = self.cfg.batch_size
        if virtual is None:
            eps = self.rng.choice(len(self.lengths), size=M, p=self.draw_probs())
        else:
            eps = np.asarray(virtual)[self.rng.choice(len(virtual), size=M, p=self.virtual_draw_probs(virtual))]
        within = (self.rng.random(M) * self.lengths[eps]).astype(np.int64)
        return {"idx": torch.as_tensor(self.offsets[eps] + within), "episodes": torch.as_tensor(eps), "draw": None,
                "virtual": virtual}

    def sample_batch(self) -> dict:
        """One batch: {"idx": flat step indices [M], "episodes": episode of each draw [B] (sampled mode: of each
        step), "draw": draw of each step [M] (exact mode; None when each draw is one step), "virtual": the virtual
        batch [B] (sampled, weighted)}."""
        cfg = self.cfg
        if cfg.full_episodes:
            eps = self.rng.choice(len(self.lengths), size=cfg.full_episodes, p=self.episode_probs)
            idx = torch.cat([self.episode_steps[e] for e in eps.tolist()])
            draw = torch.repeat_interleave(torch.arange(len(eps)), torch.as_tensor(self.lengths[eps]))
            return {"idx": idx, "episodes": torch.as_tensor(eps), "draw": draw}
        virtual = None
        if cfg.weighted:  # the authors' batch of episodes, drawn ∝ p_i
            virtual = self.rng.choice(len(self.lengths), size=cfg.virtual_episodes, p=self.episode_probs)
        return self.sample_steps(virtual)

    def draw_coefficients(self, batch: dict):
        """(c [M], normalised per-draw weights ŵ [B] or None): loss = −Σ_j c_j log π(a_j|s_j) over the batch's steps.

        exact, episode:  c_j = ŵ_d / (B · T_d)     (d = draw of step j; ŵ = B·w/Σw, mean 1 over the B draws)
        exact, step:     c_j = ŵ_d / Σ_d ŵ_d T_d
        sampled:         c_j = 1 / M               (the weights are in the draw probabilities)
        """
        idx, draw, eps = batch["idx"], batch["draw"], batch["episodes"]
        if draw is None:
            return torch.full((len(idx),), 1.0 / len(idx)), None
        w = normalize_log_weights(self.episode_log_weights()[eps]) if self.cfg.weighted else torch.ones(len(eps))
        T = torch.as_tensor(self.lengths[eps.numpy()], dtype=torch.float32)
        per_draw = w / (len(eps) * T) if self.cfg.reduction == "episode" else w / (w * T).sum()
        return per_draw[draw], (w if self.cfg.weighted else None)

    def train_step(self, batch: dict | None = None) -> dict:
        """One gradient step on `batch` (sampled if None); returns loss, the batch and its normalised weights."""
        cfg = self.cfg
        if cfg.weighted and not self.batch_refresh and self.step % cfg.refresh_every == 0 and self.step > 0:
            self.refresh()  # before sampling: the sampled mode draws episodes ∝ the weights
        batch = self.sample_batch() if batch is None else batch
        idx = batch["idx"]
        if self.batch_refresh and self.step > 0:
            self.refresh(batch["episodes"].unique())
        # a batch drawn with replacement repeats steps (256 episodes from ~95): networks run once per distinct step
        uniq, inverse = torch.unique(idx, return_inverse=True)
        c, w = self.draw_coefficients(batch)
        coef = torch.zeros(len(uniq)).index_add_(0, inverse, c)
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
        return {"loss": loss, "batch": batch, "weights": w}

    def weight_summary(self) -> dict:
        """weight_stats of the raw weights of all training episodes (max, ESS fraction, clip fractions, ...)."""
        if not self.cfg.weighted:
            return {}
        if self.batch_refresh:
            self.refresh()  # the cache of episodes outside the last batches is stale in exact mode
        w = self.episode_weights()
        return weight_stats(w, clip_min=self.cfg.clip_min, clip_max=self.cfg.clip_max, log_ratio=self.log_ratio)

    def evaluate(self, episodes: int, seed: int) -> dict:
        return evaluate(NumpyPolicy(self.policy), self.env, episodes, seed, eval_env=self.eval_env)


def train(cfg: TrainConfig, data: Episodes, init: dict | None = None, ref: GaussianPolicy | None = None,
          progress=None) -> dict:
    """Runs one training job; returns the result dict (config, curve, final score, episode weights, versions).

    Raises ValueError before training if the data's observation/action sizes do not fit the evaluation env."""
    torch.set_num_threads(1)
    eval_env = data.eval_env or get_env(data.env).gym_id
    check_shapes(eval_env, data.observations.shape[1], data.actions.shape[1], data.source or "dataset")
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
        "eval_env": describe_env(eval_env), "versions": versions(),
        "init_hash": state_hash(init) if init is not None else None,
        "episode_weights": tr.episode_weights().tolist() if cfg.weighted else None,
        "episode_returns": tr.data.returns.tolist() if cfg.weighted else None,
        "state_dict": tr.policy.state_dict(),
    }


def policy_from_state(state: dict, hidden: int = 256, layers: int = 3) -> GaussianPolicy:
    obs_dim, act_dim = state["obs_mean"].shape[0], state["log_std"].shape[0]
    p = GaussianPolicy(obs_dim, act_dim, hidden, layers)
    p.load_state_dict(state)
    return p.eval().requires_grad_(False)
