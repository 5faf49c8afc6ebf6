"""Algorithms x seeds on one dataset: resumable runs, a markdown table and PNG plots.

    python -m control.experiments --env hopper --dataset medium-replay --algos bc,filtered_bc,iwsft,iwsft_q --seeds 3
    python -m control.experiments --dataset mujoco/hopper/medium-v0 ...      # a Minari dataset id or directory
    python -m control.experiments --d4rl-file hopper_medium_replay-v2.hdf5 ...
    python -m control.experiments --quick                                     # small end-to-end demo (minutes)

Every run writes <out>/<dataset>/<algo>/seed<k>/{result.json, curve.csv}; finished runs are skipped on a rerun.
BC is always trained first for each seed: it is the `bc` result and p_ref / the initialisation of the others.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from control.data import DEFAULT_STEPS, KINDS, build
from control.episodes import Episodes, load_d4rl_hdf5, load_minari
from control.train import ALGOS, TrainConfig, policy_from_state, train


@dataclass
class ExperimentConfig:
    env: str | None = None  # environment: for built datasets (default hopper); else overrides what the dataset names
    dataset: str = "medium-replay"  # a kind to build (control.data.KINDS), a Minari id, or a Minari directory
    d4rl_file: str | None = None  # a D4RL-format HDF5 file (overrides --dataset)
    dataset_steps: int = DEFAULT_STEPS  # size of a built dataset, in environment steps
    algos: tuple = ("bc", "filtered_bc", "iwsft", "iwsft_q")  # algorithms to run (bc always runs: it is p_ref)
    seeds: int = 3  # seeds 0..seeds-1
    bc_steps: int = 10_000  # BC gradient steps (authors: 10k, Adam 1e-3)
    steps: int = 2000  # fine-tuning gradient steps of the other algorithms (authors: 2k, Adam 4e-5)
    batch_size: int = 512  # transitions per gradient step
    refresh_every: int = 50  # iw: refresh the cached per-episode log-ratios every N steps (1 = exact)
    eval_every: int = 500  # intermediate evaluation interval in steps (0 = final only)
    eval_episodes: int = 5  # episodes per intermediate evaluation
    final_eval_episodes: int = 20  # episodes of the final (reported) evaluation
    out: str = "runs/control"  # output root
    drop_nonfinite: bool = False  # drop episodes with NaN/inf values instead of failing


def load_dataset(cfg: ExperimentConfig) -> tuple[Episodes, str]:
    """Episodes and a filesystem-safe tag for the output folder."""
    if cfg.d4rl_file:
        return load_d4rl_hdf5(cfg.d4rl_file, cfg.env, cfg.drop_nonfinite), Path(cfg.d4rl_file).stem
    if cfg.dataset in KINDS:
        env = cfg.env or "hopper"
        t0 = time.time()
        did = build(env, cfg.dataset, cfg.dataset_steps)
        print(f"dataset {did} ready in {time.time() - t0:.1f}s", flush=True)
        return load_minari(did, drop_nonfinite=cfg.drop_nonfinite), _safe(did)
    return load_minari(cfg.dataset, cfg.env, cfg.drop_nonfinite), _safe(cfg.dataset)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip("/"))


def train_config(cfg: ExperimentConfig, algo: str, seed: int) -> TrainConfig:
    common = dict(seed=seed, batch_size=cfg.batch_size, eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes,
                  final_eval_episodes=cfg.final_eval_episodes, log_every=max(1, min(100, cfg.steps // 10)))
    if algo == "bc":
        return TrainConfig.bc(steps=cfg.bc_steps, **{**common, "log_every": max(1, min(100, cfg.bc_steps // 10))})
    return TrainConfig(algo=algo, steps=cfg.steps, refresh_every=cfg.refresh_every,
                       warmup_steps=min(300, cfg.steps // 5), **common)


def save_run(run_dir: Path, result: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result.pop("state_dict"), run_dir / "policy.pt")
    keys = sorted({k for row in result["curve"] for k in row}, key=lambda k: (k != "step", k))
    with open(run_dir / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(result["curve"])
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(run_dir / "result.json")  # written last: its presence marks the run finished


def check_finished_run(run_dir: Path, tcfg: TrainConfig, dataset: dict) -> None:
    """A finished run is reused only if it was trained with the same settings on the same data (else its score would
    be reported under settings it was not trained with)."""
    result = json.loads((run_dir / "result.json").read_text())
    saved = {**result["config"], "dataset": result.get("dataset")}
    wanted = json.loads(json.dumps({**asdict(tcfg), "dataset": dataset}))  # tuples -> lists, as stored
    changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"{run_dir} holds a finished run with other settings (field: (saved, requested)) {changed}; "
                         f"use another --out, or delete {run_dir} to retrain it.")


def run_all(cfg: ExperimentConfig) -> Path:
    if cfg.seeds < 1:
        raise ValueError(f"seeds={cfg.seeds} must be >= 1 (--seeds N runs seeds 0..N-1).")
    for algo in ("bc", *cfg.algos):  # check algorithm names and budgets before the (possibly long) dataset build
        train_config(cfg, algo, 0)
    torch.set_num_threads(1)
    data, tag = load_dataset(cfg)
    root = Path(cfg.out) / tag
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(data.summary(), indent=1))
    print(f"dataset: {json.dumps(data.summary())}", flush=True)
    for seed in range(cfg.seeds):
        bc_dir = root / "bc" / f"seed{seed}"
        for algo in ["bc"] + [a for a in cfg.algos if a != "bc"]:
            run_dir = root / algo / f"seed{seed}"
            tcfg = train_config(cfg, algo, seed)
            if (run_dir / "result.json").exists():
                check_finished_run(run_dir, tcfg, data.summary())
                continue
            init = ref = None
            if algo != "bc":
                init = torch.load(bc_dir / "policy.pt")
                ref = policy_from_state(init, tcfg.hidden, tcfg.layers)
            with tqdm(total=tcfg.steps, desc=f"{algo} seed{seed}", leave=False, mininterval=2) as bar:
                result = train(tcfg, data, init, ref, progress=bar)
            result["dataset"] = data.summary()
            save_run(run_dir, result)
            print(f"{algo} seed{seed}: score {result['final']['score_mean']:.1f} "
                  f"({result['wall_time_s']:.0f}s)", flush=True)
    table = write_table(root)
    plot(root)
    print(table)
    return root


# ---- reporting
# two-sided 95% Student-t quantiles by degrees of freedom; beyond 30 the normal 1.96 (at most 4% narrower)
T975 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                       2.052, 2.048, 2.045, 2.042], start=1))


def interval95(x: np.ndarray) -> tuple[float, float]:
    """Student-t 95% interval of the mean (nan with fewer than 2 values)."""
    n = len(x)
    if n < 2:
        return float("nan"), float("nan")
    h = T975.get(n - 1, 1.96) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean() - h), float(x.mean() + h)


def load_results(root: Path, algos) -> dict[str, list[dict]]:
    out = {}
    for algo in algos:
        runs = [json.loads(p.read_text()) for p in sorted((root / algo).glob("seed*/result.json"))]
        if runs:
            out[algo] = runs
    return out


def write_table(root: Path) -> str:
    results = load_results(root, ALGOS)
    ds = json.loads((root / "dataset.json").read_text())
    lines = [f"Dataset `{ds['source']}`: {ds['episodes']} episodes, {ds['steps']} steps, "
             f"normalised return mean {ds.get('score_mean', float('nan')):.1f} / max {ds.get('score_max', float('nan')):.1f}.",
             "",
             "| algorithm | seeds | final normalised score (mean ± std) | 95% interval | train steps | wall time / run |",
             "|---|---|---|---|---|---|"]
    n_eval = None
    for algo in ALGOS:
        if algo not in results:
            continue
        runs = results[algo]
        s = np.array([r["final"]["score_mean"] for r in runs])
        lo, hi = interval95(s)
        n_eval = runs[0]["final"]["episodes"]
        std = s.std(ddof=1) if len(s) > 1 else 0.0
        ci = f"[{lo:.1f}, {hi:.1f}]" if len(s) > 1 else "n/a (1 seed)"
        lines.append(f"| {algo} | {len(s)} | {s.mean():.1f} ± {std:.1f} | {ci} | "
                     f"{runs[0]['config']['steps']} | {np.mean([r['wall_time_s'] for r in runs]):.0f}s |")
    lines += ["", f"Protocol: last-score (the policy after the final step), D4RL-normalised return of the mean action "
              f"over {n_eval} evaluation episodes per seed; mean ± sample std over seeds; Student-t 95% interval of "
              f"the mean. Fine-tuning algorithms start from the same seed's BC policy."]
    text = "\n".join(lines) + "\n"
    (root / "table.md").write_text(text)
    return text


def plot(root: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(root, ALGOS)
    fig, ax = plt.subplots(figsize=(7, 4))
    for algo, runs in results.items():
        offset = 0 if algo == "bc" or "bc" not in results else results["bc"][0]["config"]["steps"]
        steps = [row["step"] for row in runs[0]["curve"] if "score" in row]
        scores = np.array([[row["score"] for row in r["curve"] if "score" in row] for r in runs
                           if len([row for row in r["curve"] if "score" in row]) == len(steps)])
        if not len(steps) or not len(scores):
            continue
        x = np.array(steps) + offset
        m, sd = scores.mean(0), scores.std(0)
        ax.plot(x, m, marker="o", ms=3, label=algo)
        ax.fill_between(x, m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("gradient steps (fine-tuning starts after BC)")
    ax.set_ylabel("normalised score")
    ax.set_title(root.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=120)
    plt.close(fig)

    iw = {a: r for a, r in results.items() if r[0].get("episode_weights")}
    if iw:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for algo, runs in iw.items():
            w = np.concatenate([r["episode_weights"] for r in runs])
            ret = np.concatenate([r["episode_returns"] for r in runs])
            axes[0].hist(np.log10(np.maximum(w, 1e-12)), bins=40, alpha=0.5, label=algo)
            axes[1].scatter(ret, w, s=6, alpha=0.5, label=algo)
        axes[0].set_xlabel("log10 importance weight (per episode, end of training)")
        axes[0].set_ylabel("episodes")
        axes[1].set_xlabel("episode return")
        axes[1].set_ylabel("importance weight")
        axes[1].set_yscale("log")
        for a in axes:
            a.legend()
        fig.tight_layout()
        fig.savefig(root / "weights.png", dpi=120)
        plt.close(fig)


QUICK = dict(dataset="medium-replay", dataset_steps=50_000, algos=("bc", "filtered_bc", "iwsft"), seeds=1,
             bc_steps=2000, steps=500, eval_every=0, final_eval_episodes=10)


def main(argv=None):
    d = ExperimentConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default=None, help="environment for built datasets (default hopper); overrides a dataset's")
    p.add_argument("--dataset", default=d.dataset, help=f"a kind to build {KINDS}, a Minari id or directory")
    p.add_argument("--d4rl-file", default=None, help="a D4RL-format HDF5 file")
    p.add_argument("--dataset-steps", type=int, default=d.dataset_steps)
    p.add_argument("--algos", default=",".join(d.algos), help=f"comma-separated, from {ALGOS}")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--bc-steps", type=int, default=d.bc_steps)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--refresh-every", type=int, default=d.refresh_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes)
    p.add_argument("--final-eval-episodes", type=int, default=d.final_eval_episodes)
    p.add_argument("--out", default=d.out)
    p.add_argument("--drop-nonfinite", action="store_true", help="drop episodes with NaN/inf instead of failing")
    p.add_argument("--quick", action="store_true", help="small end-to-end demo: " + json.dumps(QUICK))
    a = p.parse_args(argv)
    cfg = ExperimentConfig(
        env=a.env, dataset=a.dataset, d4rl_file=a.d4rl_file, dataset_steps=a.dataset_steps,
        algos=tuple(x.strip() for x in a.algos.split(",") if x.strip()), seeds=a.seeds, bc_steps=a.bc_steps,
        steps=a.steps, batch_size=a.batch_size, refresh_every=a.refresh_every, eval_every=a.eval_every,
        eval_episodes=a.eval_episodes, final_eval_episodes=a.final_eval_episodes, out=a.out,
        drop_nonfinite=a.drop_nonfinite)
    if a.quick:
        cfg = replace(cfg, **QUICK, out=a.out if a.out != d.out else "runs/control-quick")
    t0 = time.time()
    root = run_all(cfg)
    print(f"done in {time.time() - t0:.0f}s; results in {root}")


if __name__ == "__main__":
    main()
