"""Builds D4RL-style datasets offline from the behaviour agent's snapshots and writes them as Minari datasets.

    python -m control.data build --env hopper --kind medium-replay     # -> Minari id iwsft/hopper/medium-replay-v0
    python -m control.data list

Kinds (D4RL's recipe, adapted to a PPO agent):
  medium         stochastic rollouts (PPO's exploration noise) of the final snapshot
  medium-replay  stochastic rollouts of every snapshot in training order, equal steps each (what the learner saw)
  expert         mean-action rollouts of the final snapshot
  medium-expert  medium + expert, half the steps each
Datasets go to MINARI_DATASETS_PATH (default ~/.minari/datasets) with D4RL's reference scores for normalisation.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from control.agent import ASSETS, SnapshotPolicy, list_snapshots
from control.envs import get_env
from control.episodes import Episodes, save_minari

KINDS = ("medium", "medium-replay", "expert", "medium-expert")
DEFAULT_STEPS = 200_000


def dataset_id(env: str, kind: str, steps: int = DEFAULT_STEPS, seed: int = 0) -> str:
    """Minari id of a built dataset; size and seed appear only when they differ from the defaults."""
    size = "" if steps == DEFAULT_STEPS else f"-{steps // 1000}k"
    seed_tag = "" if seed == 0 else f"-seed{seed}"
    return f"iwsft/{get_env(env).name}/{kind}{size}{seed_tag}-v0"


def collect(policy: SnapshotPolicy, env: str, steps: int, seed: int, stochastic: bool):
    """Rolls out whole episodes until at least `steps` steps; returns per-episode lists and final observations."""
    import gymnasium as gym

    spec = get_env(env)
    e = gym.make(spec.gym_id)
    rng = np.random.default_rng(seed)
    obs_l, act_l, rew_l, term_l, final = [], [], [], [], []
    total, k = 0, 0
    while total < steps:
        o, _ = e.reset(seed=seed * 100_000 + k)
        k += 1
        obs, act, rew = [], [], []
        while True:
            a = policy.act(o[None], rng if stochastic else None)[0]
            o2, r, term, trunc, _ = e.step(a)
            obs.append(o), act.append(a), rew.append(r)
            o = o2
            if term or trunc:
                break
        obs_l.append(np.array(obs)), act_l.append(np.array(act)), rew_l.append(np.array(rew))
        term_l.append(bool(term)), final.append(o)
        total += len(rew)
    e.close()
    return obs_l, act_l, rew_l, term_l, final


def build_episodes(env: str, kind: str, steps: int = DEFAULT_STEPS, seed: int = 0, assets=ASSETS):
    """(Episodes, final observations [E, d]) of a dataset kind, from the snapshots in `assets`."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    snaps = [SnapshotPolicy(p) for p in list_snapshots(env, assets)]
    parts = []
    if kind == "medium":
        parts.append(collect(snaps[-1], env, steps, seed, stochastic=True))
    elif kind == "expert":
        parts.append(collect(snaps[-1], env, steps, seed, stochastic=False))
    elif kind == "medium-expert":
        parts.append(collect(snaps[-1], env, steps // 2, seed, stochastic=True))
        parts.append(collect(snaps[-1], env, steps // 2, seed + 1, stochastic=False))
    else:  # medium-replay
        per = max(1, steps // len(snaps))
        for i, s in enumerate(snaps):
            parts.append(collect(s, env, per, seed * 1000 + i, stochastic=True))
    obs, act, rew, term, final = ([x for p in parts for x in p[j]] for j in range(5))
    lengths = [len(r) for r in rew]
    eps = Episodes(np.concatenate(obs), np.concatenate(act), np.concatenate(rew),
                   np.concatenate([[0], np.cumsum(lengths)]), np.array(term), get_env(env).name,
                   f"built:{dataset_id(env, kind, steps, seed)}")
    return eps, np.array(final)


def build(env: str, kind: str, steps: int = DEFAULT_STEPS, seed: int = 0, force: bool = False, assets=ASSETS) -> str:
    """Builds the dataset and writes it as a Minari dataset; returns its id. Skips if it already exists."""
    import minari

    did = dataset_id(env, kind, steps, seed)
    if did in minari.list_local_datasets():
        if not force:
            return did
        minari.delete_dataset(did)
    t0 = time.time()
    eps, final = build_episodes(env, kind, steps, seed, assets)
    t_roll = time.time() - t0
    save_minari(eps, did, final, algorithm_name="SB3 PPO snapshots (control.agent)",
                description=f"{kind} dataset built by control.data from {len(list_snapshots(env, assets))} "
                            f"PPO snapshots, seed {seed}")
    info = {"dataset_id": did, "build_s": round(time.time() - t0, 1), "rollout_s": round(t_roll, 1), **eps.summary()}
    print(json.dumps(info), flush=True)
    return did


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a dataset from the shipped snapshots")
    b.add_argument("--env", default="hopper")
    b.add_argument("--kind", default="medium-replay", choices=KINDS)
    b.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="environment steps in the dataset (about)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    b.add_argument("--assets", default=str(ASSETS), help="folder holding <env>/snap_*.npz")
    sub.add_parser("list", help="list local Minari datasets")
    a = p.parse_args(argv)
    if a.cmd == "build":
        print(build(a.env, a.kind, a.steps, a.seed, a.force, a.assets))
    else:
        import minari
        for k in sorted(minari.list_local_datasets()):
            print(k)


if __name__ == "__main__":
    main()
