"""Every algorithm through the real experiments script with tiny budgets (built dataset, Minari, D4RL file)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from control.train import state_hash

REPO = Path(__file__).resolve().parents[1]
TINY = ["--bc-steps", "30", "--steps", "20", "--batch-size", "64", "--eval-every", "10", "--eval-episodes", "1",
        "--final-eval-episodes", "2", "--seeds", "1", "--refresh-every", "5"]


def run(args, tmp_path, ok=True):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "control.experiments", *args, "--out", str(tmp_path / "out")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if not ok:
        assert p.returncode != 0, p.stdout[-3000:]
        return p.stderr
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _mean_std(xs):
    """Naive mean and sample std (the oracle for the tables)."""
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


@pytest.mark.slow
def test_all_algorithms_on_a_grid_of_built_datasets_in_two_workers(tmp_path):
    algos = "bc,filtered_bc,sft_q,iwsft,iwsft_q"
    grid = ["--env", "hopper", "--dataset", "medium-replay,medium", "--dataset-steps", "3000", "--algos", algos,
            *TINY[:-4], "--seeds", "2", "--refresh-every", "5", "--workers", "2", "--filter-fraction", "0.25"]
    out = run(grid, tmp_path)
    roots = [tmp_path / "out" / f"iwsft_hopper_{kind}-3k-v0" for kind in ("medium-replay", "medium")]
    grid_md = (tmp_path / "out" / "grid.md").read_text()
    for root in roots:
        table = (root / "table.md").read_text()
        for seed in (0, 1):
            bc_hash = state_hash(torch.load(root / "bc" / f"seed{seed}" / "policy.pt"))
            for algo in algos.split(","):
                res = json.loads((root / algo / f"seed{seed}" / "result.json").read_text())
                assert res["config"]["algo"] == algo and res["config"]["seed"] == seed
                assert np.isfinite(res["final"]["score_mean"]) and res["final"]["episodes"] == 2
                assert (root / algo / f"seed{seed}" / "curve.csv").exists()
                if algo != "bc":  # each fine-tuning job started from its own seed's finished BC policy
                    assert res["init_hash"] == bc_hash
                if algo.startswith("iwsft"):
                    assert len(res["episode_weights"]) == res["train_episodes"]
                    assert res["curve"][-1]["weight_ess"] > 0
        for algo in algos.split(","):
            assert f"| {algo} | 2 |" in table
        assert "last-score" in table and "2 evaluation episodes" in table
        assert "Generated " in table and "mujoco " in table and "gymnasium " in table and "torch " in table
        assert "Evaluated in `Hopper-v5`" in table and "reduction `episode`" in table
        assert "| iwsft − filtered_bc | 2 |" in table
        assert (root / "curves.png").stat().st_size > 0 and (root / "weights.png").stat().st_size > 0
    # grid.md: one row per dataset, cells recomputed here from the saved results
    for root, name in zip(roots, ("hopper-medium-replay", "hopper-medium")):
        row = next(x for x in grid_md.splitlines() if x.startswith(f"| {name} |"))
        for algo in algos.split(","):
            m, sd = _mean_std([json.loads((root / algo / f"seed{k}" / "result.json").read_text())["final"]["score_mean"]
                               for k in (0, 1)])
            assert f"{m:.1f} ± {sd:.1f} (2)" in row
    assert "| **average** |" in grid_md
    # the budget line restates this test's own flags (hand-written here) and sums the saved run times
    sizes = [json.loads((root / "dataset.json").read_text())["steps"] for root in roots]
    assert (f"Budget: datasets of {min(sizes):,}-{max(sizes):,} steps; BC 30 steps on 64 sampled steps per batch; "
            "fine-tuning 20 steps on 256 whole episodes per batch (exact; drawn with replacement), weights "
            "refreshed every 5 step(s); filtered BC / iw-SFT keep the top 25% of episodes by return; loss reduction "
            "`episode`; final evaluation 2 episodes.") in grid_md
    wall = sum(json.loads(f.read_text())["wall_time_s"] for root in roots for f in root.glob("*/seed*/result.json"))
    assert f"20 runs, {wall / 3600:.2f} h of run time" in grid_md
    assert (tmp_path / "out" / "grid_curves.png").stat().st_size > 0
    assert "| hopper-medium-replay | 29.8 ± 2.1 | 70.4 ± 8.7 |" in grid_md  # CORL's published row, as context
    assert "| dataset |" in out
    # resumable: a second run trains nothing
    mtime = (roots[0] / "iwsft" / "seed1" / "result.json").stat().st_mtime
    out2 = run(grid, tmp_path)
    assert "seed0: score" not in out2 and "seed1: score" not in out2
    assert f"bc seed1: skipped, finished run in {roots[1] / 'bc' / 'seed1'} reused" in out2
    assert (roots[0] / "iwsft" / "seed1" / "result.json").stat().st_mtime == mtime
    # ... but a finished run is never reused for other settings (its score would be reported under them)
    other = [("21" if x == "20" else x) for x in grid]  # --steps 21
    err = run(other, tmp_path, ok=False)
    assert "finished run with other settings" in err and "'steps': (20, 21)" in err


def _random_hopper_episodes(n=12, seed=0):
    import gymnasium as gym

    from control.episodes import Episodes
    env = gym.make("Hopper-v5")
    rng = np.random.default_rng(seed)
    obs, act, rew, offs, term, final = [], [], [], [0], [], []
    for k in range(n):
        o, _ = env.reset(seed=k)
        while True:
            a = rng.uniform(-1, 1, 3).astype(np.float32)
            o2, r, te, tr, _ = env.step(a)
            obs.append(o), act.append(a), rew.append(r)
            o = o2
            if te or tr or len(rew) - offs[-1] >= 40:
                break
        offs.append(len(rew)), term.append(bool(te)), final.append(o)
    return Episodes(np.array(obs), np.array(act), np.array(rew), np.array(offs), np.array(term), "hopper"), np.array(final)


def test_d4rl_file_through_the_script(tmp_path):
    from control.episodes import write_d4rl_hdf5
    eps, _ = _random_hopper_episodes()
    path = tmp_path / "hopper_random-v2.hdf5"
    write_d4rl_hdf5(eps, path)
    run(["--d4rl-file", str(path), "--algos", "bc,iwsft", *TINY], tmp_path)
    res = json.loads((tmp_path / "out" / "hopper_random-v2" / "iwsft" / "seed0" / "result.json").read_text())
    assert res["dataset"]["episodes"] == 12 and res["train_episodes"] == 1  # top 10% of 12 episodes
    assert res["eval_env"]["id"] == "Hopper-v4" and res["dataset"]["split_episodes"] == {"discontinuity": 0,
                                                                                         "time_limit": 0}
    assert set(res["versions"]) >= {"mujoco", "gymnasium", "torch"}
    assert "Evaluated in `Hopper-v4`" in (tmp_path / "out" / "hopper_random-v2" / "table.md").read_text()


def test_minari_id_through_the_script(tmp_path, monkeypatch):
    from control.episodes import save_minari
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    eps, final = _random_hopper_episodes(20, seed=1)
    save_minari(eps, "test/hopper/random-v0", final)
    run(["--dataset", "test/hopper/random-v0", "--algos", "bc,filtered_bc,sft_q", *TINY], tmp_path)
    assert (tmp_path / "out" / "test_hopper_random-v0" / "table.md").exists()


@pytest.mark.slow
def test_quick_demo(tmp_path):
    """The README's embedded default: builds a small dataset, trains BC, filtered BC and iw-SFT, prints the table."""
    out = run(["--quick"], tmp_path)
    assert "| bc | 1 |" in out and "| filtered_bc | 1 |" in out and "| iwsft | 1 |" in out
    # learning curves: several evaluated points per algorithm, and loss / weight statistics for the panels
    root = next((tmp_path / "out").iterdir())
    for algo in ("bc", "filtered_bc", "iwsft"):
        curve = json.loads((root / algo / "seed0" / "result.json").read_text())["curve"]
        assert sum("score" in row for row in curve) >= 4 and all("loss" in row for row in curve)
    # weight statistics on every logged training step (evaluation-only rows carry the score alone)
    logged = [row for row in json.loads((root / "iwsft" / "seed0" / "result.json").read_text())["curve"]
              if "lr" in row]
    assert len(logged) >= 5 and all("weight_max" in row and "weight_ess" in row for row in logged)
    assert (root / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_retrains_runs_made_from_another_bc(tmp_path):
    """Deleting bc/seed0 (as the refusal message advises) and training BC differently must not reuse the fine-tuned
    runs made from the old BC policy (their initialisation and p_ref)."""
    import shutil

    import torch

    from control.episodes import write_d4rl_hdf5
    from control.train import state_hash
    eps, _ = _random_hopper_episodes(20)
    path = tmp_path / "hopper_random-v2.hdf5"
    write_d4rl_hdf5(eps, path)
    algos = "bc,iwsft"
    run(["--d4rl-file", str(path), "--algos", algos, *TINY], tmp_path)
    root = tmp_path / "out" / "hopper_random-v2"
    old = {a: json.loads((root / a / "seed0" / "result.json").read_text())["init_hash"] for a in algos.split(",")[1:]}
    assert old["iwsft"] == state_hash(torch.load(root / "bc" / "seed0" / "policy.pt"))
    shutil.rmtree(root / "bc" / "seed0")
    bc31 = [("31" if x == "30" else x) for x in TINY]  # --bc-steps 31: another BC policy
    out3 = run(["--d4rl-file", str(path), "--algos", algos, *bc31], tmp_path)
    new_hash = state_hash(torch.load(root / "bc" / "seed0" / "policy.pt"))
    assert "made from another BC policy" in out3
    for algo in algos.split(",")[1:]:
        assert f"{algo} seed0: score" in out3
        res = json.loads((root / algo / "seed0" / "result.json").read_text())
        assert res["init_hash"] == new_hash != old[algo]

