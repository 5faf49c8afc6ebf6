"""Builds D4RL-style datasets offline from the behaviour agent's snapshots and writes them as Minari datasets.

    python -m control.data build --env hopper --kind medium-replay     # -> Minari id iwsft/hopper/medium-replay-v0
    python -m control.data list
    python -m control.data build --kind medium --steps 5400            # -> iwsft/hopper/medium-5400-v0

Kinds (D4RL's recipe, adapted to a PPO agent):
  medium         stochastic rollouts (PPO's exploration noise) of the final snapshot
  medium-replay  stochastic rollouts of every snapshot in training order, equal steps each (what the learner saw)
  expert         mean-action rollouts of the final snapshot
  medium-expert  medium + expert, half the steps each
Datasets go to MINARI_DATASETS_PATH (default ~/.minari/datasets) with D4RL's reference scores for normalisation.
Only snapshots of an agent whose training finished (<assets>/<env>/agent.json, written by control.agent) are used;
--allow-unfinished-agent overrides that. Bad flags print one `error: ...` line and exit 2 (IWSFT_TRACEBACK=1 shows
the traceback).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import time

import numpy as np

from control.agent import ASSETS, SnapshotPolicy, check_agent_finished, list_snapshots
from control.envs import USER_ERRORS, exit_on_user_error, get_env
from control.episodes import Episodes, save_minari

KINDS = ("medium", "medium-replay", "expert", "medium-expert")
DEFAULT_STEPS = 200_000


def dataset_id(env: str, kind: str, steps: int = DEFAULT_STEPS, seed: int = 0) -> str:
    """Minari id of a built dataset; size and seed appear only when they differ from the defaults. The size is
    exact: `-{k}k` for a multiple of 1000 (5000 -> `-5k`), else the number itself (5400 -> `-5400`), so datasets of
    different sizes never share an id."""
    if steps == DEFAULT_STEPS:
        size = ""
    else:
        size = f"-{steps // 1000}k" if steps % 1000 == 0 else f"-{steps}"
    seed_tag = "" if seed == 0 else f"-seed{seed}"
    return f"iwsft/{get_env(env).name}/{kind}{size}{seed_tag}-v0"


def _check_request(kind: str, steps, seed) -> None:
    """Refuses sizes and seeds that cannot make a dataset (before any rollout)."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"dataset size steps={steps!r}: a dataset needs at least 1 environment step "
                         f"(CLI: --steps / --dataset-steps, default {DEFAULT_STEPS})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"dataset seed={seed!r}: the rollout seed must be an integer >= 0 (CLI: --seed, default 0)")


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


def build_episodes(env: str, kind: str, steps: int = DEFAULT_STEPS, seed: int = 0, assets=ASSETS,
                   allow_unfinished_agent: bool = False):
    """(Episodes, final observations [E, d]) of a dataset kind, from the snapshots in `assets`.

    Raises ValueError for an unknown kind, steps < 1 or seed < 0, and (unless `allow_unfinished_agent`) when the
    snapshots come from an agent whose training did not finish (control.agent.check_agent_finished);
    FileNotFoundError when `assets` has no snapshots of `env`."""
    _check_request(kind, steps, seed)
    if not allow_unfinished_agent:
        check_agent_finished(env, assets)
    snaps = [SnapshotPolicy(p) for p in list_snapshots(env, assets)]
    parts = []
    if kind == "medium":
        parts.append(collect(snaps[-1], env, steps, seed, stochastic=True))
    elif kind == "expert":
        parts.append(collect(snaps[-1], env, steps, seed, stochastic=False))
    elif kind == "medium-expert":  # the odd step goes to the medium half, so steps=1 still collects an episode
        parts.append(collect(snaps[-1], env, steps - steps // 2, seed, stochastic=True))
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


def snapshots_fingerprint(env: str, assets=ASSETS) -> str:
    """sha256 (16 hex digits) over the names and bytes of the snapshots a dataset is built from: the dataset's
    description records it, so a dataset is reused only for the snapshots that made it."""
    h = hashlib.sha256()
    for p in list_snapshots(env, assets):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


FINGERPRINT = re.compile(r"snapshots sha256 ([0-9a-f]{16})")


def check_reuse(did: str, env: str, assets=ASSETS, allow_unfinished_agent: bool = False) -> None:
    """Before an existing dataset `did` is reused: it must come from the snapshots in `assets` (the fingerprint in
    its description; datasets built before fingerprints were recorded are taken as they are) and, unless
    `allow_unfinished_agent`, not from an unfinished agent. Raises ValueError naming --force as the fix."""
    import minari

    desc = minari.load_dataset(did).storage.metadata.get("description") or ""
    fix = f"rebuild it with `python -m control.data build --env {get_env(env).name} ... --force`"
    if "UNFINISHED agent" in desc and not allow_unfinished_agent:
        raise ValueError(f"dataset {did} exists but was built from the snapshots of an UNFINISHED agent "
                         f"(--allow-unfinished-agent): {fix}, or pass --allow-unfinished-agent to use it anyway.")
    m = FINGERPRINT.search(desc)
    if m and m.group(1) != snapshots_fingerprint(env, assets):
        raise ValueError(f"dataset {did} exists but was built from other snapshots (sha256 {m.group(1)}) than "
                         f"those in {assets}/{get_env(env).name} (sha256 {snapshots_fingerprint(env, assets)}): "
                         f"{fix}.")


def build(env: str, kind: str, steps: int = DEFAULT_STEPS, seed: int = 0, force: bool = False, assets=ASSETS,
          allow_unfinished_agent: bool = False) -> str:
    """Builds the dataset and writes it as a Minari dataset; returns its id. Reuses an existing one built from the
    same snapshots (check_reuse).

    Raises as build_episodes does (steps < 1, seed < 0, unknown kind, no snapshots, snapshots of an unfinished
    agent unless `allow_unfinished_agent`), before anything is rolled out or written; as check_reuse does when the
    existing dataset came from other snapshots or an unfinished agent."""
    import minari

    _check_request(kind, steps, seed)
    did = dataset_id(env, kind, steps, seed)
    if did in minari.list_local_datasets() and not force:
        check_reuse(did, env, assets, allow_unfinished_agent)
        return did
    t0 = time.time()
    eps, final = build_episodes(env, kind, steps, seed, assets, allow_unfinished_agent)
    t_roll = time.time() - t0
    if did in minari.list_local_datasets():  # --force: the old one goes only once the new one is built
        minari.delete_dataset(did)
    n_snaps = len(list_snapshots(env, assets))
    try:
        rec = check_agent_finished(env, assets)
        agent = f"a finished agent ({rec.get('steps_done', '?')} steps, {rec.get('hyperparams_source', '?')})"
    except ValueError:  # only with allow_unfinished_agent: say so in the dataset itself
        agent = f"an UNFINISHED agent (last snapshot at {SnapshotPolicy(list_snapshots(env, assets)[-1]).steps} steps)"
    save_minari(eps, did, final, algorithm_name="SB3 PPO snapshots (control.agent)",
                description=f"{kind} dataset built by control.data from {n_snaps} PPO snapshots of {agent}, "
                            f"seed {seed} (snapshots sha256 {snapshots_fingerprint(env, assets)})")
    info = {"dataset_id": did, "build_s": round(time.time() - t0, 1), "rollout_s": round(t_roll, 1), **eps.summary()}
    print(json.dumps(info), flush=True)
    return did


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""




def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a dataset from the behaviour agent's snapshots", description=__doc__,
                       formatter_class=_HelpFormatter)
    b.add_argument("--env", default="hopper",
                   help="environment to roll out in: hopper, walker2d or halfcheetah (or a gymnasium id such as "
                        "Hopper-v5); its snapshots are read from <assets>/<env>/")
    b.add_argument("--kind", default="medium-replay", choices=KINDS, help="dataset kind (see the kinds above)")
    b.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="environment steps in the dataset (at least 1; whole episodes, so a little more)")
    b.add_argument("--seed", type=int, default=0,
                   help="rollout seed (>= 0); a seed other than 0 is part of the dataset id (-seed<N>)")
    b.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    b.add_argument("--assets", default=str(ASSETS), help="folder holding <env>/snap_*.npz and <env>/agent.json")
    b.add_argument("--allow-unfinished-agent", action="store_true",
                   help="build even from snapshots of an agent whose training did not finish (no finished "
                        "agent.json); the dataset's description says so")
    sub.add_parser("list", help="list local Minari datasets", formatter_class=_HelpFormatter)
    return p


def _check_cli(a) -> None:
    """Refuses bad flags before anything runs, naming the flag and the fix."""
    if a.steps < 1:
        raise ValueError(f"--steps {a.steps}: a dataset needs at least 1 environment step (default {DEFAULT_STEPS})")
    if a.seed < 0:
        raise ValueError(f"--seed {a.seed}: the rollout seed must be >= 0 (default 0)")
    try:
        spec = get_env(a.env)
    except ValueError as e:
        raise ValueError(f"--env {a.env!r}: {e}") from None
    if "-v" in a.env.lower() and a.env.lower() != spec.gym_id.lower():  # e.g. Walker2d-v4: we roll out in -v5 only
        raise ValueError(f"--env {a.env!r}: datasets are built in {spec.gym_id}, the environment the behaviour agent "
                         f"was trained in; pass {spec.name} or {spec.gym_id}")
    from pathlib import Path
    folder = Path(a.assets) / get_env(a.env).name
    if not sorted(folder.glob("snap_*.npz")):
        raise FileNotFoundError(
            f"--assets {a.assets}: no behaviour-policy snapshots (snap_*.npz) in {folder}. Point --assets at the "
            f"folder holding <env>/snap_*.npz (default {ASSETS}), or train them with `python -m control.agent "
            f"--env {get_env(a.env).name} --assets {a.assets}` (resumable)")


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "build":
            _check_cli(a)
            print(build(a.env, a.kind, a.steps, a.seed, a.force, a.assets, a.allow_unfinished_agent))
        else:
            import minari
            local = sorted(minari.list_local_datasets())
            if not local:
                print(f"no Minari datasets in {minari.storage.get_dataset_path()} (set MINARI_DATASETS_PATH to look "
                      f"elsewhere; build one with `python -m control.data build`)")
            for k in local:
                print(k)
    except USER_ERRORS as e:
        exit_on_user_error(e)


if __name__ == "__main__":
    main()
