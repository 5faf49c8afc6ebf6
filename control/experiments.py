"""Algorithms x seeds on a dataset, or a grid of environments x datasets: resumable runs, markdown tables, plots.

    python -m control.experiments --env hopper --dataset medium-replay --algos bc,filtered_bc,iwsft,iwsft_q --seeds 3
    python -m control.experiments --dataset mujoco/hopper/medium-v0 ...      # a Minari dataset id or directory
    python -m control.experiments --d4rl-file hopper_medium_replay-v2.hdf5 ...
    python -m control.experiments --quick                                     # small end-to-end demo (minutes)
    python -m control.experiments --env hopper,walker2d,halfcheetah --dataset medium,medium-replay,medium-expert \\
        --algos bc,filtered_bc,sft_q,iwsft,iwsft_q --seeds 3 --workers 2     # the grid: <out>/grid.md
    python -m control.experiments --cpu-grid --workers 2                      # that grid at a reduced budget (~1.5 h)

Every run writes <out>/<dataset>/<algo>/seed<k>/{result.json, curve.csv, policy.pt}; finished runs are skipped on a
rerun if their settings and data match (else the script stops and lists what differs). BC is always trained first for
each seed: it is the `bc` result and p_ref / the initialisation of the others; each fine-tuned run records the hash of
the BC policy it started from and is retrained when that BC policy has changed. `--workers N` runs the jobs (one
per dataset, seed and algorithm; a seed's fine-tuning jobs once its BC job has finished) in N processes (one torch
thread each).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from control.data import DEFAULT_STEPS, KINDS, build
from control.episodes import Episodes, load_d4rl_hdf5, load_minari
from control.published import ALGOS as CORL_ALGOS, CORL_LAST, SOURCE as CORL_SOURCE, corl_context, dataset_kind
from control.envs import USER_ERRORS, check_eval_env, check_shapes, exit_on_user_error, get_env, versions
from control.train import ALGOS, REDUCTIONS, TrainConfig, policy_from_state, state_hash, train


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
    reduction: str = "episode"  # "episode" (the authors': mean within each episode) or "step" (see control.train)
    batch_size: int = 512  # sampled approximation: transitions per gradient step
    full_episodes: int = 256  # fine-tuning batches of this many whole episodes (exact, the authors'); 0: sampled approx.
    bc_full_episodes: int = 0  # BC batches of whole episodes (authors: 128; slow on CPU); 0: sampled approximation
    refresh_every: int = 1  # iw: refresh the per-episode log-ratios under q every N steps (1 = every step)
    filter_fraction: float = 0.1  # filtered_bc / iwsft: top fraction of episodes by return (authors: 10%)
    eval_every: int = 500  # intermediate evaluation interval in steps (0 = final only)
    eval_episodes: int = 5  # episodes per intermediate evaluation
    final_eval_episodes: int = 100  # episodes of the final (reported) evaluation (authors: 100)
    eval_env: str | None = None  # gymnasium id to evaluate in instead of the dataset's own env (D4RL default: -v4)
    out: str = "runs/control"  # output root
    drop_nonfinite: bool = False  # drop episodes with NaN/inf values instead of failing
    workers: int = 1  # seeds run in this many processes (one torch thread each)


def load_dataset(cfg: ExperimentConfig) -> tuple[Episodes, str]:
    """Episodes and a filesystem-safe tag for the output folder."""
    if cfg.d4rl_file:
        return load_d4rl_hdf5(cfg.d4rl_file, cfg.env, cfg.drop_nonfinite, eval_env=cfg.eval_env), Path(cfg.d4rl_file).stem
    if cfg.dataset in KINDS:
        env = cfg.env or "hopper"
        t0 = time.time()
        did = build(env, cfg.dataset, cfg.dataset_steps)
        print(f"dataset {did} ready in {time.time() - t0:.1f}s", flush=True)
        return load_minari(did, drop_nonfinite=cfg.drop_nonfinite, eval_env=cfg.eval_env), _safe(did)
    return load_minari(cfg.dataset, cfg.env, cfg.drop_nonfinite, eval_env=cfg.eval_env), _safe(cfg.dataset)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip("/"))


def train_config(cfg: ExperimentConfig, algo: str, seed: int) -> TrainConfig:
    common = dict(seed=seed, batch_size=cfg.batch_size, eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes,
                  final_eval_episodes=cfg.final_eval_episodes, log_every=max(1, min(100, cfg.steps // 10)),
                  reduction=cfg.reduction)
    if algo == "bc":  # authors: batches of 128 episodes for BC, 256 for the rest
        return TrainConfig.bc(steps=cfg.bc_steps, full_episodes=cfg.bc_full_episodes,
                              **{**common, "log_every": max(1, min(100, cfg.bc_steps // 10))})
    return TrainConfig(algo=algo, steps=cfg.steps, refresh_every=cfg.refresh_every, full_episodes=cfg.full_episodes,
                       warmup_steps=min(300, cfg.steps // 5), filter_fraction=cfg.filter_fraction, **common)


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


def settings_changed(run_dir: Path, tcfg: TrainConfig, dataset: dict) -> dict:
    """{field: (saved, requested)} where the finished run in `run_dir` differs from `tcfg` / `dataset`."""
    result = json.loads((run_dir / "result.json").read_text())
    saved_ds = result.get("dataset") or {}
    wanted_ds = json.loads(json.dumps(dataset))
    if "content_sha256" not in saved_ds:  # saved before the content hash was recorded: matched by the summary
        wanted_ds.pop("content_sha256", None)
    # the data record field by field ("dataset.eval_env"), so a refusal names what differs, not the whole record
    saved = {**result["config"], **{f"dataset.{k}": v for k, v in saved_ds.items()}}
    wanted = json.loads(json.dumps({**asdict(tcfg), **{f"dataset.{k}": v for k, v in wanted_ds.items()}}))
    if saved.get("eval_every") == 0 and wanted.get("eval_every") == 0:
        wanted["eval_episodes"] = saved.get("eval_episodes")  # never used without intermediate evaluations
    keys = list(wanted) + [k for k in saved if k.startswith("dataset.") and k not in wanted]
    return {k: (saved.get(k), wanted.get(k)) for k in keys if saved.get(k) != wanted.get(k)}


def check_all_finished_runs(cfg: "ExperimentConfig", root: Path, dataset: dict) -> None:
    """Before any training: raises listing every finished run under `root` whose settings or data differ from the
    requested ones (each would otherwise be reported under settings it was not trained with)."""
    bad = {}
    for seed in range(cfg.seeds):
        bc_policy = root / "bc" / f"seed{seed}" / "policy.pt"
        bc_hash = state_hash(torch.load(bc_policy)) if (bc_policy.parent / "result.json").exists() else None
        for algo in ["bc"] + [a for a in cfg.algos if a != "bc"]:
            run_dir = root / algo / f"seed{seed}"
            if (run_dir / "result.json").exists():
                if algo != "bc" and (bc_hash is None or
                                     json.loads((run_dir / "result.json").read_text()).get("init_hash") != bc_hash):
                    continue  # made from another (or a missing) BC policy: retrained anyway (check_finished_run)
                changed = settings_changed(run_dir, train_config(cfg, algo, seed), dataset)
                if changed:
                    bad[f"{algo}/seed{seed}"] = changed
    if bad:
        listing = "; ".join(f"{k}: {v}" for k, v in bad.items())
        raise ValueError(f"{root} holds a finished run with other settings in {len(bad)} run folder(s) (field: "
                         f"(saved, requested)): {listing}. Use another --out, or delete those run folders to retrain "
                         f"them.")


def check_finished_run(run_dir: Path, tcfg: TrainConfig, dataset: dict, init_hash: str | None = None) -> bool:
    """True if the finished run in `run_dir` can be reused. A run is reused only if it was trained with the same
    settings on the same data (else its score would be reported under settings it was not trained with: raises, the
    user decides); a fine-tuned run whose BC start / p_ref (`init_hash`) differs from the current BC policy is stale
    (BC was retrained): False, so it is retrained."""
    result = json.loads((run_dir / "result.json").read_text())
    if init_hash is not None and result.get("init_hash") != init_hash:
        print(f"{run_dir}: made from another BC policy (hash {result.get('init_hash')} != {init_hash}); retraining",
              flush=True)
        return False
    changed = settings_changed(run_dir, tcfg, dataset)
    if changed:
        raise ValueError(f"{run_dir} holds a finished run with other settings (field: (saved, requested)) {changed}; "
                         f"use another --out, or delete {run_dir} to retrain it.")
    return True


def run_seed(cfg: ExperimentConfig, seed: int, data: Episodes | None = None, algos=None) -> list[str]:
    """`algos` (default: BC, then every other algorithm from it) for one seed (resumable); returns the printed
    lines. Any algorithm other than BC needs this seed's finished BC run."""
    torch.set_num_threads(1)
    if data is None:  # worker process: load the (already built) dataset again
        data = load_dataset(cfg)[0]
    root = Path(cfg.out) / load_dataset_tag(cfg)
    bc_dir = root / "bc" / f"seed{seed}"
    lines = []
    for algo in algos or ["bc"] + [a for a in cfg.algos if a != "bc"]:
        run_dir = root / algo / f"seed{seed}"
        tcfg = train_config(cfg, algo, seed)
        init = ref = init_hash = None
        if algo != "bc":
            init = torch.load(bc_dir / "policy.pt")
            init_hash = state_hash(init)
            ref = policy_from_state(init, tcfg.hidden, tcfg.layers)
        if (run_dir / "result.json").exists():
            if check_finished_run(run_dir, tcfg, data.summary(), init_hash):
                done = json.loads((run_dir / "result.json").read_text())
                line = (f"{algo} seed{seed}: skipped, finished run in {run_dir} reused "
                        f"(final {done['final']['score_mean']:.1f})")
                print(line, flush=True)
                lines.append(line)
                continue
            shutil.rmtree(run_dir)
        with tqdm(total=tcfg.steps, desc=f"{algo} seed{seed}", leave=False, mininterval=2,
                  disable=cfg.workers > 1) as bar:
            result = train(tcfg, data, init, ref, progress=bar)
        result["dataset"] = data.summary()
        save_run(run_dir, result)
        line = f"{algo} seed{seed}: score {result['final']['score_mean']:.1f} ({result['wall_time_s']:.0f}s)"
        print(line, flush=True)
        lines.append(line)
    return lines


def load_dataset_tag(cfg: ExperimentConfig) -> str:
    """The output folder name load_dataset gives (without loading)."""
    if cfg.d4rl_file:
        return Path(cfg.d4rl_file).stem
    if cfg.dataset in KINDS:
        from control.data import dataset_id
        return _safe(dataset_id(cfg.env or "hopper", cfg.dataset, cfg.dataset_steps))
    return _safe(cfg.dataset)


def check_filter(cfg: ExperimentConfig, data: Episodes) -> None:
    """Before BC trains: the top-fraction filter of filtered_bc / iwsft must keep at least one episode."""
    need = [a for a in cfg.algos if a in ("filtered_bc", "iwsft")]
    k = math.floor(cfg.filter_fraction * data.num_episodes + 1e-9)  # as iwsft.top_fraction_mask counts
    if need and not 0 < cfg.filter_fraction <= 1:
        raise ValueError(f"--filter-fraction {cfg.filter_fraction} must be in (0, 1].")
    if need and k == 0:
        raise ValueError(f"{data.source}: {', '.join(need)} keep the top {cfg.filter_fraction:g} of episodes by return, "
                         f"which of {data.num_episodes} episodes is none; use more data, --filter-fraction >= "
                         f"{1 / data.num_episodes:.3g}, or drop {', '.join(need)} from --algos.")


def expand_grid(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One config per (env, dataset) of the comma-separated `env` x `dataset` lists ("hopper,walker2d" x
    "medium,medium-replay"); a single env and dataset give [cfg]. Raises ValueError for a list where the data names
    its own environment (Minari id or folder, D4RL file) or an empty entry."""
    envs = [e.strip() for e in (cfg.env or "").split(",")] if cfg.env else [None]
    datasets = [d.strip() for d in cfg.dataset.split(",")]
    envs, datasets = list(dict.fromkeys(envs)), list(dict.fromkeys(datasets))  # a repeated name runs once
    if any(e == "" for e in envs) or any(d == "" for d in datasets):
        raise ValueError(f"--env {cfg.env!r} / --dataset {cfg.dataset!r}: empty entry in a comma-separated list.")
    if len(envs) * len(datasets) == 1:
        return [replace(cfg, env=envs[0], dataset=datasets[0])]
    if cfg.d4rl_file:
        raise ValueError("--d4rl-file runs one file: drop the comma lists from --env / --dataset.")
    if len(envs) > 1 and any(d not in KINDS for d in datasets):
        raise ValueError(f"--env {cfg.env}: several environments only go with datasets to build {KINDS}; a Minari "
                         f"dataset records its own environment (run it with one --env or none).")
    return [replace(cfg, env=e, dataset=d) for e in envs for d in datasets]


def prepare(cfg: ExperimentConfig) -> tuple[Episodes, Path]:
    """Builds/loads one dataset and checks it before any training: shapes fit the evaluation env, the filter keeps
    an episode, finished runs under its folder match the requested settings. Writes dataset.json."""
    data, tag = load_dataset(cfg)
    check_shapes(data.eval_env or get_env(data.env).gym_id, data.observations.shape[1], data.actions.shape[1],
                 data.source)
    check_filter(cfg, data)
    root = Path(cfg.out) / tag
    check_all_finished_runs(cfg, root, data.summary())
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(data.summary(), indent=1))
    print(f"dataset: {json.dumps(data.summary())}", flush=True)
    return data, root


def run_jobs(cfgs: list[ExperimentConfig], workers: int) -> None:
    """Every (dataset, seed, algorithm) run as its own job in `workers` processes (one torch thread each): all BC
    runs are queued first; a seed's fine-tuning runs are queued when its BC run finishes (they start from it). Finer
    than one process per seed, so no core idles while another works through a whole seed. The first failure cancels
    the queued jobs, waits for the running ones (each saves only when finished) and is raised."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, wait
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint) as pool:
        running = {pool.submit(run_seed, c, seed, None, ["bc"]): (c, seed, "bc")
                   for c in cfgs for seed in range(c.seeds)}
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    c, seed, algo = running.pop(f)
                    f.result()  # raises the job's error
                    if algo == "bc":  # this seed's fine-tuning runs start from its BC policy: queue them now
                        for a in (a for a in c.algos if a != "bc"):
                            running[pool.submit(run_seed, c, seed, None, [a])] = (c, seed, a)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):  # stopped by the user: stop the running jobs too (they would
                for proc in list((getattr(pool, "_processes", None) or {}).values()):  # outlive this process)
                    proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _ignore_sigint():
    """Workers ignore Ctrl-C (sent to the whole process group): the main process stops them, without tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_all(cfg: ExperimentConfig) -> Path:
    """Runs the experiment (one dataset, or the grid of comma-separated --env x --dataset); returns the output
    folder of the dataset (one dataset) or `cfg.out` (a grid, whose table is grid.md there)."""
    if cfg.seeds < 1:
        raise ValueError(f"seeds={cfg.seeds} must be >= 1 (--seeds N runs seeds 0..N-1).")
    if cfg.workers < 1:
        raise ValueError(f"workers={cfg.workers} must be >= 1.")
    for flag, val in (("--full-episodes", cfg.full_episodes), ("--bc-full-episodes", cfg.bc_full_episodes)):
        if val < 0:
            raise ValueError(f"{flag} {val}: must be >= 0 (whole episodes per batch; 0 = the sampled approximation)")
    if not cfg.algos:
        raise ValueError("--algos is empty: name at least one of " + ", ".join(ALGOS) + " (e.g. --algos bc).")
    for flag, val in (("--bc-steps", cfg.bc_steps), ("--steps", cfg.steps), ("--dataset-steps", cfg.dataset_steps)):
        if val < 1:
            raise ValueError(f"{flag} {val}: must be >= 1.")
    if any(a in ("filtered_bc", "iwsft") for a in cfg.algos) and not 0 < cfg.filter_fraction <= 1:  # also nan
        raise ValueError(f"--filter-fraction {cfg.filter_fraction}: must be in (0, 1] (the top fraction of episodes "
                         f"by return that filtered_bc / iwsft keep; authors: 0.1).")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out}: is a file, not a folder; pick a folder for the runs.")
    if cfg.eval_env:
        check_eval_env(cfg.eval_env)
    for algo in ("bc", *cfg.algos):  # check algorithm names and budgets before the (possibly long) dataset build
        try:
            train_config(cfg, algo, 0)
        except ValueError as e:  # name the flag, not the trainer's field (TrainConfig.eval_every=-1 -> --eval-every -1)
            raise ValueError(re.sub(r"TrainConfig\.(\w+)=", lambda m: "--" + m.group(1).replace("_", "-") + " ",
                                    str(e))) from None
    cfgs = expand_grid(cfg)
    for c in cfgs:  # an unknown environment, or one without behaviour snapshots, is refused before any build
        if c.env is not None:
            get_env(c.env)
        if c.dataset in KINDS and not c.d4rl_file:
            import minari
            from control.agent import check_agent_finished
            from control.data import dataset_id
            if dataset_id(c.env or "hopper", c.dataset, c.dataset_steps) not in minari.list_local_datasets():
                check_agent_finished(c.env or "hopper")  # snapshots of a finished agent (control.data build --help)
    torch.set_num_threads(1)
    with out_lock(Path(cfg.out)):
        return _run_locked(cfg, cfgs)


LOCK = ".control-experiments.lock"  # in --out while a run writes there: holds the writer's pid


@contextlib.contextmanager
def out_lock(out: Path):
    """Only one control.experiments writes to an --out folder at a time (two would rewrite each other's dataset.json
    and tables, and could train the same run twice). Raises ValueError while another live process holds the lock; a
    lock left by a killed process is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    try:
        pid = int(lock.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        pid = 0
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if alive:
            raise ValueError(f"--out {out}: another control.experiments (pid {pid}) is writing there; wait for it to "
                             f"finish, stop it, or pick another --out (if pid {pid} is not ours, delete {lock}).")
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        if lock.exists() and lock.read_text().strip() == str(os.getpid()):
            lock.unlink()


def _run_locked(cfg: ExperimentConfig, cfgs: list[ExperimentConfig]) -> Path:
    prepared = [(c, *prepare(c)) for c in cfgs]  # every dataset built and checked before any training
    jobs = sum(c.seeds * (1 + len([a for a in c.algos if a != "bc"])) for c in cfgs)
    if cfg.workers == 1 or jobs == 1:
        for c, data, _ in prepared:
            for seed in range(c.seeds):
                run_seed(c, seed, data)
    else:
        run_jobs([c for c, _, _ in prepared], min(cfg.workers, jobs))
    for _, _, root in prepared:
        table = write_table(root)
        plot(root)
        print(table)
    if len(prepared) == 1:
        return prepared[0][2]
    grid = write_grid_table(Path(cfg.out), [root for _, _, root in prepared])
    plot_grid(Path(cfg.out), [root for _, _, root in prepared])
    print(grid)
    return Path(cfg.out)


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
    """table.md: date, versions, evaluation env and protocol, then one row per algorithm (mean ± std over seeds)."""
    results = load_results(root, ALGOS)
    ds = json.loads((root / "dataset.json").read_text())
    first = next(iter(results.values()))[0] if results else {}
    vers = first.get("versions") or versions()
    ev = first.get("eval_env") or ds.get("eval_env") or {}
    tuned = [a for a in ("iwsft", "iwsft_q", "filtered_bc", "sft_q") if a in results]  # fine-tuned algorithms
    cfg0 = results[tuned[0]][0]["config"] if tuned else {}
    parts = []
    if cfg0:
        parts.append("fine-tuning " + (
            f"exact ({cfg0.get('full_episodes')} whole episodes per batch)" if cfg0.get("full_episodes")
            else f"sampled approximation ({cfg0.get('batch_size')} steps per batch drawn from a virtual batch of "
                 f"{cfg0.get('virtual_episodes')} episodes ∝ weight)"))
    bc0 = (results.get("bc") or [{}])[0].get("config", {})
    if bc0:
        parts.append("BC exact ({} whole episodes per batch)".format(bc0["full_episodes"]) if bc0.get("full_episodes")
                     else "BC sampled approximation ({} steps per batch)".format(bc0.get("batch_size")))
    mode = "; ".join(parts) or "no runs yet"
    cfg0 = cfg0 or bc0
    split = ds.get("split_episodes")
    lines = [f"Generated {datetime.date.today().isoformat()} with " + ", ".join(f"{k} {v}" for k, v in vers.items())
             + ".", "",
             f"Dataset `{ds['source']}`: {ds['episodes']} episodes, {ds['steps']} steps, "
             f"normalised return mean {ds.get('score_mean', float('nan')):.1f} / max {ds.get('score_max', float('nan')):.1f}"
             + (f"; unmarked episode ends split: {split}" if split is not None else "") + ".",
             f"Evaluated in `{ev.get('id')}`" + (f" with kwargs {ev.get('kwargs')}" if ev.get("kwargs") else "")
             + (f" (warning: {ds['eval_warning'].rstrip('.')})" if ds.get("eval_warning") else "")
             + f". Loss reduction `{cfg0.get('reduction', 'step')}`, {mode}"
             + (f", importance weights refreshed every {cfg0.get('refresh_every')} step(s)."
                if any(a in results for a in ("iwsft", "iwsft_q")) else "."),
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
    context = corl_context(ds.get("env"), ds.get("source", ""))
    if context:
        lines += ["", context]
    lines += paired_lines(results) + weight_lines(results)
    lines += ["", f"Protocol: last-score (the policy after the final step), D4RL-normalised return of the mean action "
              f"over {n_eval} evaluation episodes per seed; mean ± sample std over seeds; Student-t 95% interval of "
              f"the mean. Fine-tuning algorithms start from the same seed's BC policy."]
    text = "\n".join(lines) + "\n"
    (root / "table.md").write_text(text)
    return text


# (a, b) pairs whose per-seed difference a − b the table reports, when both ran
PAIRS = (("filtered_bc", "bc"), ("sft_q", "filtered_bc"), ("iwsft", "filtered_bc"), ("iwsft_q", "filtered_bc"),
         ("iwsft_q", "iwsft"), ("iwsft_q", "sft_q"))


def paired_differences(results: dict[str, list[dict]], a: str, b: str) -> tuple[list[int], np.ndarray]:
    """(seeds, a − b per seed [n]): final scores of the seeds both algorithms finished. Seeds pair runs that start
    from the same BC policy and use the same evaluation seeds, so the difference removes most seed-to-seed spread."""
    sa = {r["config"]["seed"]: r["final"]["score_mean"] for r in results.get(a, [])}
    sb = {r["config"]["seed"]: r["final"]["score_mean"] for r in results.get(b, [])}
    seeds = sorted(set(sa) & set(sb))
    return seeds, np.array([sa[s] - sb[s] for s in seeds], dtype=float)


def paired_lines(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: mean paired difference, its Student-t 95% interval and the per-seed values."""
    rows = []
    for a, b in PAIRS:
        seeds, d = paired_differences(results, a, b)
        if not seeds:
            continue
        lo, hi = interval95(d)
        ci = f"[{lo:+.1f}, {hi:+.1f}]" if len(d) > 1 else "n/a (1 seed)"
        per = ", ".join(f"{x:+.1f}" for x in d)
        rows.append(f"| {a} − {b} | {len(d)} | {d.mean():+.1f} | {ci} | {per} |")
    if not rows:
        return []
    return ["", "Paired by seed (same BC start, same evaluation seeds):", "",
            "| difference | seeds | mean | 95% interval | per seed |", "|---|---|---|---|---|", *rows]


def weight_lines(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: the importance weights at the end of training (last logged row) per weighted run."""
    rows = []
    for algo in ("iwsft", "iwsft_q"):
        for r in results.get(algo, []):
            last = next((row for row in reversed(r["curve"]) if "weight_max" in row), None)
            w = np.asarray(r.get("episode_weights") or [], dtype=float)
            if last is None or not len(w):
                continue
            at_clip = int((w >= r["config"]["clip_max"] * (1 - 1e-6)).sum())
            ret = np.asarray(r.get("episode_returns") or [], dtype=float)
            top = ""
            if len(ret) == len(w):  # where the weight went: the top-weighted episode's return and its rank (1 = best)
                i = int(np.argmax(w))
                top = f"{ret[i]:.0f} ({int((ret > ret[i]).sum()) + 1} of {len(ret)})"
            rows.append(f"| {algo} | {r['config']['seed']} | {len(w)} | {last['weight_max']:.4g} | "
                        f"{last['weight_ess']:.3f} | {at_clip} | {top} | {r['final']['score_mean']:.1f} |")
    if not rows:
        return []
    return ["", "Importance weights over the training episodes after the last step (ESS fraction = (Σw)² / (n Σw²)):",
            "", "| algorithm | seed | episodes | max weight | ESS fraction | at the clip | return of the top-weighted "
            "episode (rank by return) | final score |", "|---|---|---|---|---|---|---|---|", *rows]


def write_grid_table(out: Path, roots: list[Path]) -> str:
    """grid.md: a CORL-style table (a row per dataset, a column per algorithm, mean ± std over seeds, then the
    average over datasets), CORL's published scores for the same rows as context, and the paired iw-SFT − filtered
    BC differences per dataset and pooled over all (dataset, seed) pairs."""
    rows, per_algo, pooled = [], {}, []
    algos = [a for a in ALGOS if any((r / a).is_dir() for r in roots)]
    corl = []
    for root in roots:
        ds = json.loads((root / "dataset.json").read_text())
        kind = dataset_kind(ds.get("source", ""))
        name = f"{ds.get('env')}-{kind}" if ds.get("env") and kind else root.name
        results = load_results(root, algos)
        cells = []
        for a in algos:
            s = np.array([r["final"]["score_mean"] for r in results.get(a, [])])
            if len(s):
                per_algo.setdefault(a, []).append(s.mean())
                cells.append(f"{s.mean():.1f} ± {s.std(ddof=1) if len(s) > 1 else 0.0:.1f} ({len(s)})")
            else:
                cells.append("—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        seeds, d = paired_differences(results, "iwsft", "filtered_bc")
        if len(d):
            pooled += list(d)
            lo, hi = interval95(d)
            pair = f"{d.mean():+.1f} [{lo:+.1f}, {hi:+.1f}]" if len(d) > 1 else f"{d.mean():+.1f} (1 seed)"
            rows[-1] += f" {pair} |"
        else:
            rows[-1] += " — |"
        pub = CORL_LAST.get((ds.get("env"), kind))
        if pub:
            corl.append(f"| {name} | " + " | ".join(f"{m:.1f} ± {sd:.1f}" for m, sd in pub.values()) + " |")
    avg = [f"{np.mean(per_algo[a]):.1f}" if len(per_algo.get(a, [])) == len(roots) else "—" for a in algos]
    if pooled:
        lo, hi = interval95(np.array(pooled))
        pooled_txt = f"{np.mean(pooled):+.1f} [{lo:+.1f}, {hi:+.1f}] ({len(pooled)} pairs)"
    else:
        pooled_txt = "—"
    vers = versions()
    lines = [f"Generated {datetime.date.today().isoformat()} with " + ", ".join(f"{k} {v}" for k, v in vers.items())
             + f". Per-dataset details (settings, protocol, weights, plots): <dataset>/table.md.", "",
             *budget_lines(roots, algos), "",
             "Final D4RL-normalised score, mean ± std over seeds (seeds); last column: iw-SFT − filtered BC paired by "
             "seed, mean [95% interval].", "",
             "| dataset | " + " | ".join(algos) + " | iwsft − filtered_bc |",
             "|---|" + "---|" * (len(algos) + 1), *rows,
             "| **average** | " + " | ".join(avg) + f" | {pooled_txt} |"]
    if corl:
        lines += ["", f"Context, a different data source ({CORL_SOURCE}; D4RL -v2 files, SAC data on mujoco-py): "
                  "not a baseline of ours.", "", "| dataset | " + " | ".join(CORL_ALGOS) + " |",
                  "|---|" + "---|" * len(CORL_ALGOS), *corl]
    text = "\n".join(lines) + "\n"
    (out / "grid.md").write_text(text)
    return text


def budget_lines(roots: list[Path], algos) -> list[str]:
    """The budget the grid ran at, next to the authors' (BC 10k steps, fine-tuning 2k steps on batches of 256 whole
    episodes, D4RL datasets of 0.2-2M steps, 100 final evaluation episodes), and the summed run time (CPU-hours
    when each run had one core)."""
    runs = [r for root in roots for rs in load_results(root, algos).values() for r in rs]
    if not runs:
        return []
    bc = next((r["config"] for r in runs if r["config"]["algo"] == "bc"), None)
    ft = next((r["config"] for r in runs if r["config"]["algo"] != "bc"), None)
    sizes = [json.loads((root / "dataset.json").read_text())["steps"] for root in roots]
    parts = [f"datasets of {min(sizes):,}-{max(sizes):,} steps"]
    if bc:
        parts.append(f"BC {bc['steps']:,} steps" + (f" on {bc['full_episodes']} whole episodes per batch"
                                                    if bc["full_episodes"] else f" on {bc['batch_size']} sampled steps per batch"))
    if ft:
        parts.append(f"fine-tuning {ft['steps']:,} steps" + (
            f" on {ft['full_episodes']} whole episodes per batch (exact; drawn with replacement), weights "
            f"refreshed every {ft['refresh_every']} step(s)" if ft["full_episodes"] else
            f" on {ft['batch_size']} sampled steps per batch (sampled approximation)"))
        parts.append(f"filtered BC / iw-SFT keep the top {100 * ft['filter_fraction']:g}% of episodes by return; "
                     f"loss reduction `{ft['reduction']}`")
    parts.append(f"final evaluation {runs[0]['final']['episodes']} episodes")
    hours = sum(r["wall_time_s"] for r in runs) / 3600
    return [f"Budget: {'; '.join(parts)}. The authors': D4RL datasets of 0.2-2M steps; BC 10,000 steps; fine-tuning "
            f"2,000 steps on 256 whole episodes per batch; 100 evaluation episodes. {len(runs)} runs, "
            f"{hours:.2f} h of run time summed over runs (one core each)."]


STYLES = {"bc": ("C0", "-"), "filtered_bc": ("C1", "--"), "sft_q": ("C4", "-."), "iwsft": ("C2", "-"),
          "iwsft_q": ("C3", ":")}


def _series(runs: list[dict], key: str):
    """(steps, [seeds, points]) of curve rows holding `key`, over the seeds that logged the same steps."""
    steps = [row["step"] for row in runs[0]["curve"] if key in row]
    vals = [[row[key] for row in r["curve"] if key in row] for r in runs]
    vals = np.array([v for v in vals if len(v) == len(steps)], dtype=float)
    return np.array(steps), vals


def plot(root: Path) -> None:
    """curves.png: score, loss, max weight and ESS per algorithm (lines; mean ± std band over seeds; fine-tuning
    drawn after BC's steps, starting from BC's final score); weights.png: final per-episode weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(root, ALGOS)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("score", "normalised score", False), ("loss", "training loss", False),
              ("weight_max", "max raw weight (clip 1000)", True), ("weight_ess", "weight ESS fraction", True)]
    bc_steps = results["bc"][0]["config"]["steps"] if "bc" in results else 0
    for ax, (key, label, log) in zip(axes.flat, panels):
        for algo, runs in results.items():
            steps, vals = _series(runs, key)
            if not len(steps) or not len(vals):
                continue
            x = steps + (0 if algo == "bc" else bc_steps)
            m, sd = vals.mean(0), vals.std(0)
            if key == "score" and algo != "bc" and "bc" in results:  # fine-tuning starts from BC's final policy
                bc_final = np.mean([r["final"]["score_mean"] for r in results["bc"]])
                x, m, sd = np.concatenate([[bc_steps], x]), np.concatenate([[bc_final], m]), np.concatenate([[0], sd])
            color, ls = STYLES.get(algo, (None, "-"))
            ax.plot(x, m, color=color, ls=ls, lw=1.6, label=algo)
            if len(vals) > 1:
                ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.15)
        ax.set_ylabel(label)
        ax.set_xlabel("gradient steps (fine-tuning starts after BC)")
        if log:
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(root.name)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=110)
    plt.close(fig)

    iw = {a: r for a, r in results.items() if r[0].get("episode_weights")}
    if iw:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for algo, runs in iw.items():
            w = np.concatenate([r["episode_weights"] for r in runs])
            ret = np.concatenate([r["episode_returns"] for r in runs])
            axes[0].hist(np.log10(np.maximum(w, 1e-12)), bins=40, alpha=0.5, label=algo)
            axes[1].scatter(ret, np.maximum(w, 1e-12), s=6, alpha=0.5, label=algo)
        axes[0].set_xlabel("log10 importance weight (per episode, end of training; 1e-12 floor)")
        axes[0].set_ylabel("episodes")
        axes[1].set_xlabel("episode return")
        axes[1].set_ylabel("importance weight")
        axes[1].set_yscale("log")
        for a in axes:
            a.legend()
        fig.tight_layout()
        fig.savefig(root / "weights.png", dpi=120)
        plt.close(fig)


def plot_grid(out: Path, roots: list[Path]) -> None:
    """grid_curves.png: one panel per dataset of the grid, the normalised score of every fine-tuning algorithm over
    its gradient steps (mean over seeds; step 0 is BC's final score, where they all start) and BC's final score as
    a horizontal line. BC's own curve is in each dataset's curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(roots))
    rows = math.ceil(len(roots) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, root in zip(axes.flat, roots):
        results = load_results(root, ALGOS)
        bc_final = np.mean([r["final"]["score_mean"] for r in results["bc"]]) if "bc" in results else None
        for algo, runs in results.items():
            color, ls = STYLES.get(algo, (None, "-"))
            if algo == "bc":
                ax.axhline(bc_final, color=color, ls=ls, lw=1.2, label="bc (final)")
                continue
            steps, x_m = _series(runs, "score")
            if not len(steps) or not len(x_m):
                continue
            x, m = steps, x_m.mean(0)
            if bc_final is not None:
                x, m = np.concatenate([[0], x]), np.concatenate([[bc_final], m])
            ax.plot(x, m, color=color, ls=ls, lw=1.4, label=algo)
        ds = json.loads((root / "dataset.json").read_text())
        kind = dataset_kind(ds.get("source", ""))
        ax.set_title(f"{ds.get('env')}-{kind}" if kind else root.name, fontsize=9)
        ax.set_xlabel("fine-tuning gradient steps", fontsize=8)
        ax.set_ylabel("normalised score", fontsize=8)
    for ax in list(axes.flat)[len(roots):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "grid_curves.png", dpi=100)
    plt.close(fig)


# the quick demo shows the plumbing in a few minutes: the sampled approximation (its table header says so)
QUICK = dict(dataset="medium-replay", dataset_steps=50_000, algos=("bc", "filtered_bc", "iwsft"), seeds=1,
             bc_steps=2000, steps=500, eval_every=125, final_eval_episodes=10, full_episodes=0)


# the locomotion grid at a named, reduced budget that fits ~90 min on 2 cores (docs/control.md, "What the full
# locomotion grid costs on CPU"): the authors' estimator (exact whole-episode batches, weights refreshed every step)
# but 50k-step datasets, 3k BC steps and 400 fine-tuning steps (authors: 0.2-2M-step D4RL datasets, 10k and 2k);
# its grid.md prints these settings next to the table. Only --seeds, --workers and --out may still be given.
CPU_GRID = dict(env="hopper,walker2d,halfcheetah", dataset="medium,medium-replay,medium-expert", dataset_steps=50_000,
                algos=ALGOS, bc_steps=3000, steps=400, full_episodes=256, refresh_every=1, eval_every=100,
                eval_episodes=5, final_eval_episodes=30,
                # the authors' settings, held so that --cpu-grid always measures the same thing
                filter_fraction=0.1, reduction="episode", batch_size=512, bc_full_episodes=0, eval_env=None,
                drop_nonfinite=False)
PRESETS = {"--quick": (QUICK, "runs/control-quick"), "--cpu-grid": (CPU_GRID, "runs/control-grid-cpu")}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    d = ExperimentConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--env", default=None,
                   help="environment (hopper, walker2d, halfcheetah; a comma list runs the grid with --dataset): picks the simulator a built dataset is recorded "
                        "and evaluated in (hopper when not given) and the D4RL reference scores; for a Minari dataset or "
                        "D4RL file it only fills in an environment the data does not record (refused if it "
                        "contradicts the recorded one)")
    p.add_argument("--dataset", default=d.dataset, help=f"a kind to build {KINDS}, a Minari id or directory; a comma list (e.g. "
                   "medium,medium-replay,medium-expert) runs every --env x dataset and writes <out>/grid.md")
    p.add_argument("--d4rl-file", default=None, help="a D4RL-format HDF5 file (overrides --dataset)")
    p.add_argument("--dataset-steps", type=int, default=d.dataset_steps,
                   help="size of a built dataset in environment steps (ignored for Minari ids and D4RL files)")
    p.add_argument("--algos", default=",".join(d.algos), help=f"comma-separated, from {ALGOS}; bc always runs")
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs seeds 0..N-1")
    p.add_argument("--bc-steps", type=int, default=d.bc_steps, help="BC gradient steps (authors: 10k)")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning gradient steps of the others (authors: 2k)")
    p.add_argument("--reduction", default=d.reduction, choices=REDUCTIONS,
                   help="episode: the authors' (mean within each episode, episodes count ∝ w); step: ∝ w × length")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sampled approximation: steps per batch")
    p.add_argument("--full-episodes", type=int, default=d.full_episodes,
                   help="whole episodes per fine-tuning batch, the authors' layout and weight dynamics (832 ms CPU "
                        "per iw-SFT step with 256 episodes on Hopper medium-replay, one core of a loaded box); 0 = the sampled approximation (4x cheaper, but its "
                        "noisier gradients move the policy less under Adam and its weights stay flat at full scale: "
                        "docs/control.md)")
    p.add_argument("--bc-full-episodes", type=int, default=d.bc_full_episodes,
                   help="whole episodes per BC batch (authors: 128; slow on CPU: BC runs 10k steps over all episodes); "
                        "0 = sampled approximation")
    p.add_argument("--refresh-every", type=int, default=d.refresh_every,
                   help="iw algorithms: recompute the per-episode log-ratios under q every N steps (1 = exact)")
    p.add_argument("--filter-fraction", type=float, default=d.filter_fraction,
                   help="filtered_bc / iwsft: keep this top fraction of episodes by return (authors: 0.1)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="intermediate evaluation every N steps "
                   "(0 = final only)")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes, help="episodes per intermediate evaluation")
    p.add_argument("--final-eval-episodes", type=int, default=d.final_eval_episodes,
                   help="episodes of the final, reported evaluation (authors: 100)")
    p.add_argument("--eval-env", default=None,
                   help="gymnasium id to evaluate in instead of the dataset's own (D4RL files: <Env>-v4 by default); "
                        "warns when its version, kwargs or step limit differ from the dataset's")
    p.add_argument("--workers", type=int, default=d.workers, help="parallel processes, one torch thread each; every (dataset, seed, algorithm) run is one job, "
                        "a seed's fine-tuning runs start when its BC run has finished")
    p.add_argument("--out", default=d.out, help="output root (<out>/<dataset>/<algo>/seed<k>/)")
    p.add_argument("--drop-nonfinite", action="store_true", help="drop episodes with NaN/inf instead of failing")
    p.add_argument("--quick", action="store_true", help="small end-to-end demo: " + json.dumps(QUICK))
    p.add_argument("--cpu-grid", action="store_true",
                   help="the 3 environments x 3 datasets x 5 algorithms grid at a reduced budget named in its "
                        "grid.md (~1.5 h with --workers 2, twice that with 1; out runs/control-grid-cpu): "
                        + json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in CPU_GRID.items()}))
    return p


def main(argv=None):
    d = ExperimentConfig()
    a = build_parser().parse_args(argv)
    cfg = ExperimentConfig(
        env=a.env, dataset=a.dataset, d4rl_file=a.d4rl_file, dataset_steps=a.dataset_steps,
        algos=tuple(x.strip() for x in a.algos.split(",") if x.strip()), seeds=a.seeds, bc_steps=a.bc_steps,
        steps=a.steps, reduction=a.reduction, batch_size=a.batch_size, full_episodes=a.full_episodes,
        bc_full_episodes=a.bc_full_episodes, refresh_every=a.refresh_every, filter_fraction=a.filter_fraction, eval_every=a.eval_every,
        eval_episodes=a.eval_episodes, final_eval_episodes=a.final_eval_episodes, eval_env=a.eval_env, out=a.out,
        drop_nonfinite=a.drop_nonfinite, workers=a.workers)
    chosen = [flag for flag in PRESETS if getattr(a, flag[2:].replace("-", "_"))]
    if len(chosen) > 1:
        print(f"error: {' and '.join(chosen)} are two presets; pick one.", file=sys.stderr)
        raise SystemExit(2)
    if chosen:  # a preset's own settings: a flag that would change one is refused, not silently overridden
        flag = chosen[0]
        preset, out = PRESETS[flag]
        given = {k: getattr(cfg, k) for k in preset if getattr(cfg, k) != getattr(d, k)}
        if given:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            shown = ", ".join(f"{k}={','.join(preset[k]) if isinstance(preset[k], tuple) else preset[k]}"
                              for k in given)
            print(f"error: {flag} sets {flags} itself ({shown}); drop {flags} or drop {flag}.", file=sys.stderr)
            raise SystemExit(2)
        cfg = replace(cfg, **preset, out=a.out if a.out != d.out else out)
    t0 = time.time()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as Ctrl-C does: workers stopped, finished runs kept
    try:
        root = run_all(cfg)
    except USER_ERRORS as e:
        exit_on_user_error(e)
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - t0:.0f}s: finished runs are kept (each is saved only when done); "
              f"the same command resumes.", file=sys.stderr)
        raise SystemExit(130)
    print(f"done in {time.time() - t0:.0f}s; results in {root}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
