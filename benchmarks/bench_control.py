"""Control benchmarks: trainer speed vs the naive padded formulation, and a full BC + iw-SFT run.

    OMP_NUM_THREADS=1 python benchmarks/bench_control.py                 # speed (needs the medium-replay dataset)
    OMP_NUM_THREADS=1 python benchmarks/bench_control.py --full-run      # also time BC (10k) + iw-SFT (2k) end to end
    OMP_NUM_THREADS=1 python benchmarks/bench_control.py --dynamics 2000 --bc-steps 10000  # max weight / ESS: exact
                                                                           # mode vs the sampled approximation
    OMP_NUM_THREADS=1 python benchmarks/bench_control.py --dynamics-small # the same at small scale vs the authors' loop
    OMP_NUM_THREADS=1 python benchmarks/bench_control.py --step-cost     # CPU time per step of each algorithm

Speed: one iw-SFT gradient step three ways on Hopper medium-replay, all from the same BC init and p_ref:
  naive   the authors' layout: B whole episodes padded to the longest, policy/q/p_ref forwards on [B, T], their
          per-episode reduction −mean_i[(w_i/Σw) Σ_t log π / T_i]
  exact   our trainer with whole episodes (flat, no padding), log-ratios refreshed every step for the batch's
          episodes, policy and q run once per distinct step of the batch (same loss and gradient, × B)
  fast    the sampled approximation (`--full-episodes 0`): 512 steps drawn from a virtual batch of 256 episodes ∝
          weight, log-ratios of all training episodes refreshed every step
naive and exact are first checked to give the same loss on the same batch.
--dynamics N: max weight and ESS of all training episodes every 25 steps over N iw-SFT steps, exact mode vs the
sampled approximation (--modes; written to --dynamics-out as JSON and PNG; --bc-policy reuses a trained BC policy).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from control.data import build  # noqa: E402
from control.envs import versions  # noqa: E402
from control.episodes import load_minari  # noqa: E402
from control.train import TrainConfig, Trainer  # noqa: E402


def gaussian_logp(policy, obs, act):
    mean, log_std = policy(obs)
    return (-((act - mean) ** 2) * torch.exp(-2 * log_std) / 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def naive_step(policy, q, ref, opt, data, episodes, temperature=10.0, clip_max=1000.0, ema_decay=0.9):
    """One step of the authors' padded formulation; returns the loss."""
    lengths = [int(data.offsets[e + 1] - data.offsets[e]) for e in episodes]
    B, T = len(episodes), max(lengths)
    obs = torch.zeros(B, T, data.observations.shape[1])
    act = torch.zeros(B, T, data.actions.shape[1])
    mask = torch.zeros(B, T)
    for i, e in enumerate(episodes):
        s, t = data.offsets[e], data.offsets[e + 1]
        obs[i, :t - s], act[i, :t - s], mask[i, :t - s] = torch.as_tensor(data.observations[s:t]), \
            torch.as_tensor(data.actions[s:t]), 1
    with torch.no_grad():
        log_ratio = ((gaussian_logp(q, obs, act) - gaussian_logp(ref, obs, act)) * mask).sum(1) / mask.sum(1)
        w = torch.clamp(torch.exp(temperature * log_ratio), 0, clip_max)
    ell = (gaussian_logp(policy, obs, act) * mask).sum(1) / mask.sum(1)  # mean within each episode
    loss = -((w / w.sum()) * ell).mean()  # the authors' reduction
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for pq, p in zip(q.parameters(), policy.parameters()):
            pq.lerp_(p, 1 - ema_decay)
    return loss.item()


def weight_dynamics(data, init, ref, steps: int, modes: dict, every: int = 25, seed: int = 0) -> dict:
    """Weight max / ESS fraction of all training episodes every `every` steps of one iw-SFT run per mode."""
    out = {}
    for name, kw in modes.items():
        cfg = TrainConfig(algo="iwsft", steps=steps, seed=seed, warmup_steps=min(300, steps // 5), **kw)
        tr = Trainer(cfg, data, init=copy.deepcopy(init), ref=ref)
        rows, t0 = [], time.time()
        for s in range(steps + 1):
            if s % every == 0:
                st = tr.weight_summary()
                rows.append({"step": s, "weight_max": st["weight_max"], "weight_ess": st["weight_ess"],
                             "weight_clip_hi": st["weight_clip_hi"]})
            if s < steps:
                tr.train_step()
        out[name] = {"config": kw, "rows": rows, "seconds": time.time() - t0}
        print(name, f"{out[name]['seconds']:.0f}s", rows[-1], flush=True)
    return out


def small_dynamics(seeds: int = 3, steps: int = 200, every: int = 10, B: int = 8, lr: float = 1e-3) -> dict:
    """Whole-run weight dynamics at small scale (10 random episodes of 5-60 steps, p_ref fitted to them): the
    authors' padded loop (naive_step, B episodes per step) vs our default / exact mode / stale weights.
    Returns {name: {"rows": [{step, weight_max, weight_ess}] (seed means; max as the mean of log10)}}."""
    from control.episodes import Episodes
    from control.policy import GaussianPolicy
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=10)
    N = int(lengths.sum())
    obs = rng.normal(size=(N, 3)).astype(np.float32)
    act = np.tanh(obs[:, :2] * rng.normal(size=(1, 2)) + 0.6 * rng.normal(size=(N, 2))).astype(np.float32)
    data = Episodes(obs, act, rng.normal(size=N), np.concatenate([[0], np.cumsum(lengths)]), np.zeros(10, bool),
                    env="hopper", source="tiny")
    torch.manual_seed(0)
    ref = GaussianPolicy(3, 2, 16, 2)
    ref.set_obs_stats(obs)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        (-ref.log_prob(torch.as_tensor(obs), torch.as_tensor(act)).mean()).backward()
        opt.step()
    ref = ref.eval().requires_grad_(False)
    all_eps = list(range(data.num_episodes))

    def weights_all(q):
        with torch.no_grad():
            return torch.stack([torch.clamp(torch.exp(10 * (gaussian_logp(q, *ep).mean() - gaussian_logp(ref, *ep).mean())),
                                            0, 1000) for ep in [(torch.as_tensor(data.observations[s:t]),
                                                                 torch.as_tensor(data.actions[s:t]))
                                                                for s, t in zip(data.offsets[:-1], data.offsets[1:])]])

    def stats(w):
        w = w.double()
        return math.log10(w.max().item()), (w.sum() ** 2 / (len(w) * (w * w).sum())).item()

    runs = {}
    for seed in range(seeds):
        r = np.random.default_rng(seed)
        torch.manual_seed(seed)
        policy, q = copy.deepcopy(ref).train().requires_grad_(True), copy.deepcopy(ref)
        opt = torch.optim.Adam(policy.parameters(), lr=lr)
        rows = []
        for step in range(steps + 1):
            if step % every == 0:
                rows.append((step, *stats(weights_all(q))))
            if step < steps:
                naive_step(policy, q, ref, opt, data, r.integers(0, len(all_eps), size=B).tolist())
        runs.setdefault("authors' loop (padded, B=8)", []).append(rows)
        for name, kw in (("default (sampled, refresh 1)", {}), ("exact mode (B=8)", {"full_episodes": B}),
                         ("sampled, refresh 10 (stale)", {"refresh_every": 10})):
            cfg = TrainConfig(algo="iwsft", steps=steps, filter_fraction=1.0, lr=lr, warmup_steps=0, cosine=False,
                              hidden=16, layers=2, eval_every=0, seed=seed, virtual_episodes=B, **kw)
            tr = Trainer(cfg, data, init=copy.deepcopy(ref.state_dict()), ref=ref)
            rows = []
            for step in range(steps + 1):
                if step % every == 0:
                    st = tr.weight_summary()
                    rows.append((step, math.log10(st["weight_max"]), st["weight_ess"]))
                if step < steps:
                    tr.train_step()
            runs.setdefault(name, []).append(rows)
    out = {}
    for name, rs in runs.items():
        a = np.array(rs).mean(0)
        out[name] = {"rows": [{"step": int(x[0]), "weight_max": float(10 ** x[1]), "weight_ess": float(x[2])}
                              for x in a]}
        ref_rows = np.array(runs["authors' loop (padded, B=8)"]).mean(0)
        out[name]["max_gap_log10_max"] = float(np.abs(a[:, 1] - ref_rows[:, 1]).max())
        out[name]["max_gap_ess"] = float(np.abs(a[:, 2] - ref_rows[:, 2]).max())
    return out


def plot_dynamics(res: dict, path: Path, xlabel: str = "iw-SFT step (Hopper medium-replay, from BC)") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in res.items():
        x = [row["step"] for row in r["rows"]]
        axes[0].plot(x, [row["weight_max"] for row in r["rows"]], label=name)
        axes[1].plot(x, [row["weight_ess"] for row in r["rows"]], label=name)
    axes[0].set_yscale("log"), axes[1].set_yscale("log")
    axes[0].set_ylabel("max raw weight (clip 1000)"), axes[1].set_ylabel("ESS fraction (1 = uniform)")
    for a in axes:
        a.set_xlabel(xlabel)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_cost(data) -> dict:
    """CPU seconds per gradient step (time.process_time, so less sensitive to other jobs) of each algorithm's default
    and of the exact mode, from a BC policy trained 50 steps (the cost does not depend on the weights' values)."""
    bc = Trainer(TrainConfig.bc(steps=50), data)
    for _ in range(50):
        bc.train_step()
    init, ref = bc.policy.state_dict(), copy.deepcopy(bc.policy).eval().requires_grad_(False)
    out = {}
    for name, kw, n in (("bc", None, 100), ("filtered_bc", {"algo": "filtered_bc"}, 100), ("iwsft", {}, 30),
                        ("iwsft_q", {"algo": "iwsft_q"}, 30), ("iwsft exact 256", {"full_episodes": 256}, 4)):
        tr = Trainer(TrainConfig.bc(), data) if kw is None else \
            Trainer(TrainConfig(**{"algo": "iwsft", **kw}), data, init=copy.deepcopy(init), ref=ref)
        tr.train_step()
        c0 = time.process_time()
        for _ in range(n):
            tr.train_step()
        out[name] = {"cpu_ms_per_step": 1000 * (time.process_time() - c0) / n, "train_episodes": tr.data.num_episodes,
                     "train_steps": tr.data.num_steps}
    return out


def timed(fn, n):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=256, help="episodes per naive/exact batch (authors: 256)")
    p.add_argument("--naive-steps", type=int, default=3)
    p.add_argument("--exact-steps", type=int, default=3)
    p.add_argument("--fast-steps", type=int, default=300)
    p.add_argument("--full-run", action="store_true")
    p.add_argument("--dynamics", type=int, default=0, help="iw-SFT steps of the weight-dynamics comparison (0: skip)")
    p.add_argument("--dynamics-out", default="docs/control_weight_dynamics")
    p.add_argument("--step-cost", action="store_true", help="CPU time per step of each algorithm's default")
    p.add_argument("--dynamics-small", action="store_true",
                   help="whole-run weight dynamics at small scale vs the authors' padded loop (docs plot; ~1 min)")
    p.add_argument("--bc-steps", type=int, default=200, help="BC steps for p_ref (--dynamics: use 10000)")
    p.add_argument("--bc-policy", default=None,
                   help="a trained BC policy.pt (e.g. runs/control/<dataset>/bc/seed0/policy.pt) instead of --bc-steps")
    p.add_argument("--modes", default="sampled,exact,stale",
                   help="--dynamics modes, from sampled, exact, stale, exact_step (exact mode with the per-step "
                        "reduction) (default: %(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.dynamics_small:
        res = small_dynamics()
        Path(a.dynamics_out + "_small.json").write_text(json.dumps(res, indent=1))
        plot_dynamics(res, Path(a.dynamics_out + "_small.png"), xlabel="step (small data: 10 episodes, lr 1e-3)")
        print(json.dumps({k: {x: v[x] for x in v if x != "rows"} for k, v in res.items()}, indent=1))
        return
    data = load_minari(build("hopper", "medium-replay"))
    if a.step_cost:
        print(json.dumps(step_cost(data), indent=1))
        return
    bc = Trainer(TrainConfig.bc(steps=a.bc_steps), data)  # a briefly trained BC policy is enough for timing
    if a.bc_policy:
        bc.policy.load_state_dict(torch.load(a.bc_policy))
    else:
        for _ in range(a.bc_steps):
            bc.train_step()
    init, ref = bc.policy.state_dict(), copy.deepcopy(bc.policy).eval().requires_grad_(False)
    res = {"dataset": data.summary(), "threads": 1, "episodes_per_batch": a.episodes, "versions": versions()}
    if a.dynamics:
        known = {"sampled": ("sampled approximation (512 steps/batch, refresh 1)", {}),
                 "exact": (f"exact, {a.episodes} whole episodes (the default since issue 8's rerun)",
                           {"full_episodes": a.episodes, "refresh_every": 1}),
                 "stale": ("sampled approximation, refresh 10 (stale)", {"refresh_every": 10}),
                 "exact_step": (f"exact, per-step reduction (before issue 8)",
                                {"full_episodes": a.episodes, "refresh_every": 1, "reduction": "step"})}
        bad = [m for m in a.modes.split(",") if m not in known]
        if bad:
            p.error(f"--modes: unknown {bad}; choose from {sorted(known)}")
        modes = dict(known[m] for m in a.modes.split(","))
        res["bc_policy"] = a.bc_policy or f"{a.bc_steps} BC steps"
        res["dynamics"] = weight_dynamics(data, init, ref, a.dynamics, modes)
        Path(a.dynamics_out + ".json").write_text(json.dumps(res, indent=1, default=float))
        plot_dynamics(res["dynamics"], Path(a.dynamics_out + ".png"))
        print(json.dumps(res, default=float))
        return

    # 1. same loss on the same batch of whole episodes (all episodes: iw-SFT(Q) over the percentile-selected set)
    cfg_exact = TrainConfig(algo="iwsft_q", full_episodes=a.episodes, refresh_every=1, warmup_steps=0, cosine=False)
    tr = Trainer(cfg_exact, data, init=copy.deepcopy(init), ref=ref)
    for _ in range(3):  # move q away from p_ref so that the weights are not all 1
        tr.train_step()
    batch = tr.sample_batch()
    eps = batch["episodes"].tolist()
    policy = copy.deepcopy(tr.policy)
    q = copy.deepcopy(tr.ema.module)
    naive_loss = naive_step(policy, q, ref, torch.optim.Adam(policy.parameters(), lr=0.0), tr.data, eps)
    tr.refresh()
    fast_loss = tr.train_step(batch)["loss"] / len(eps)  # ours is B × the authors' loss (Adam ignores the factor)
    res["loss_naive"], res["loss_exact"] = naive_loss, fast_loss
    res["loss_abs_diff"] = abs(naive_loss - fast_loss)
    if res["loss_abs_diff"] > 1e-5 * max(1e-2, abs(naive_loss)):  # speeds are only comparable at identical losses
        raise SystemExit(f"naive loss {naive_loss} != our exact loss {fast_loss}: the timings would compare "
                         "different objectives")

    # 2. steps per second
    policy = copy.deepcopy(tr.policy).train()
    q = copy.deepcopy(tr.ema.module)
    opt = torch.optim.Adam(policy.parameters(), lr=4e-5)
    rng = np.random.default_rng(0)
    probs = tr.episode_probs

    def naive():
        naive_step(policy, q, ref, opt, tr.data, rng.choice(len(probs), a.episodes, p=probs))

    res["naive_steps_per_s"] = timed(naive, a.naive_steps)
    res["exact_steps_per_s"] = timed(tr.train_step, a.exact_steps)
    fast = Trainer(TrainConfig(algo="iwsft_q"), data, init=copy.deepcopy(init), ref=ref)
    res["fast_steps_per_s"] = timed(fast.train_step, a.fast_steps)
    res["fast_batch_steps"] = fast.cfg.batch_size
    res["fast_refresh_every"] = fast.cfg.refresh_every
    res["speedup_exact_vs_naive"] = res["exact_steps_per_s"] / res["naive_steps_per_s"]
    res["speedup_fast_vs_naive"] = res["fast_steps_per_s"] / res["naive_steps_per_s"]

    if a.full_run:
        import tempfile

        from control.experiments import ExperimentConfig, run_all
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            run_all(ExperimentConfig(env="hopper", dataset="medium-replay", algos=("bc", "iwsft"), seeds=1, out=d))
            res["full_run_bc_plus_iwsft_s"] = time.time() - t0
    print(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
