"""Fast evaluation: N episodes stepped in lockstep, one batched numpy forward of the mean action per time step."""
from __future__ import annotations

import numpy as np

from control.envs import get_env, make_env, normalized_score


def rollout_returns(act_fn, env: str, episodes: int, seed: int = 0, max_steps: int | None = None,
                    eval_env: str | None = None) -> np.ndarray:
    """Undiscounted returns of `episodes` episodes of `act_fn(obs [n, d]) -> actions [n, a]`, in `eval_env` (a
    gymnasium id or EnvSpec JSON, e.g. the dataset's own spec; default: the short name's id, e.g. Hopper-v5)."""
    envs = [make_env(eval_env or get_env(env).gym_id) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed * 10_000 + i)[0] for i, e in enumerate(envs)])
    returns = np.zeros(episodes)
    active = np.ones(episodes, dtype=bool)
    t = 0
    while active.any() and (max_steps is None or t < max_steps):
        idx = np.flatnonzero(active)
        actions = act_fn(obs[idx])
        for j, a in zip(idx, actions):
            o, r, term, trunc, _ = envs[j].step(a)
            returns[j] += r
            obs[j] = o
            if term or trunc:
                active[j] = False
        t += 1
    for e in envs:
        e.close()
    return returns


def evaluate(act_fn, env: str, episodes: int, seed: int = 0, eval_env: str | None = None) -> dict:
    """Mean action rollouts -> returns and D4RL-normalised scores (reference scores of the short name `env`)."""
    ret = rollout_returns(act_fn, env, episodes, seed, eval_env=eval_env)
    score = normalized_score(env, ret)
    return {"return_mean": float(ret.mean()), "score_mean": float(score.mean()), "score_std": float(score.std()),
            "episodes": int(episodes), "scores": [round(float(s), 3) for s in score]}
