"""Environment names, gymnasium ids and D4RL reference scores (for normalised scores)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvSpec:
    name: str  # short name used on the command line ("hopper")
    gym_id: str  # gymnasium id of the environment we roll out in
    ref_min: float  # D4RL random-policy return (normalised score 0)
    ref_max: float  # D4RL expert return (normalised score 100)


ENVS = {
    "hopper": EnvSpec("hopper", "Hopper-v5", -20.272305, 3234.3),
    "halfcheetah": EnvSpec("halfcheetah", "HalfCheetah-v5", -280.178953, 12135.0),
    "walker2d": EnvSpec("walker2d", "Walker2d-v5", 1.629008, 4592.3),
}


def get_env(name: str) -> EnvSpec:
    """Looks an environment up by short name ("hopper") or gymnasium id ("Hopper-v5", "Hopper-v4")."""
    key = name.lower()
    for spec in ENVS.values():
        if key == spec.name or key == spec.gym_id.lower() or key.split("-")[0] == spec.name:
            return spec
    raise ValueError(
        f"unknown environment {name!r}: expected one of {sorted(ENVS)} (or their gymnasium ids "
        f"{[s.gym_id for s in ENVS.values()]})"
    )


def normalized_score(env: str | EnvSpec, episode_return):
    """D4RL normalised score: 100 * (return - random) / (expert - random). Works on floats and numpy arrays."""
    spec = env if isinstance(env, EnvSpec) else get_env(env)
    return 100.0 * (episode_return - spec.ref_min) / (spec.ref_max - spec.ref_min)
