"""Environment names, gymnasium ids, D4RL reference scores, the environment a dataset is evaluated in, versions.

A dataset is evaluated in its own environment: for a Minari dataset the gymnasium `EnvSpec` it was recorded with
(its evaluation spec when it has one, with all kwargs, as Minari's `recover_environment(eval_env=True)` builds it);
for a D4RL file the gymnasium version matching the file's MuJoCo version (`eval_id_for_d4rl`).
"""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvSpec:
    name: str  # short name used on the command line ("hopper")
    gym_id: str  # gymnasium id of the environment we roll out in (built datasets)
    ref_min: float  # D4RL random-policy return (normalised score 0)
    ref_max: float  # D4RL expert return (normalised score 100)


ENVS = {
    "hopper": EnvSpec("hopper", "Hopper-v5", -20.272305, 3234.3),
    "halfcheetah": EnvSpec("halfcheetah", "HalfCheetah-v5", -280.178953, 12135.0),
    "walker2d": EnvSpec("walker2d", "Walker2d-v5", 1.629008, 4592.3),
}
# D4RL's -v0/-v1/-v2 files were recorded in gym's Hopper-v3 / Walker2d-v3 / HalfCheetah-v3 (mujoco-py). gymnasium 1.x
# has no v2/v3 (they need mujoco-py); its -v4 is the same model and reward with the new `mujoco` bindings, while -v5
# changes dynamics/reward details (Walker2d-v5 fixes the foot friction, Hopper-v5 the healthy reward), so -v4 is the
# closest environment available to score D4RL files in.
D4RL_EVAL_VERSION = "v4"


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


def gym_id_version(gym_id: str) -> str | None:
    """"Hopper-v4" -> "v4" (None when the id has no version)."""
    m = re.search(r"-(v\d+)$", gym_id)
    return m.group(1) if m else None


def eval_id_for_d4rl(name: str, data_version: str | None = None, override: str | None = None) -> str:
    """Gymnasium id to score a D4RL file of environment `name` in.

    Default: `<Env>-v4` (see D4RL_EVAL_VERSION). `override` (a full id such as "Hopper-v5") replaces it, with a
    warning when its version differs from the one the data was recorded in (`data_version`, default v3).
    """
    base = get_env(name).gym_id.rsplit("-", 1)[0]  # "Hopper"
    if override is None:
        return f"{base}-{D4RL_EVAL_VERSION}"
    if get_env(override).name != get_env(name).name:
        raise ValueError(f"--eval-env {override!r} is not an environment of {name!r}; use e.g. {base}-v4")
    recorded = data_version or "v3"
    ver = gym_id_version(override)
    if ver not in (recorded, D4RL_EVAL_VERSION):
        warnings.warn(f"evaluating a D4RL file recorded in {base}-{recorded} in {override}: its dynamics/reward "
                      f"differ, so scores are not comparable with published D4RL numbers (closest available: "
                      f"{base}-{D4RL_EVAL_VERSION}).", UserWarning, stacklevel=2)
    return override


def make_env(spec: str):
    """gymnasium env from an id ("Hopper-v4") or a JSON-serialised gymnasium EnvSpec (with its kwargs)."""
    import gymnasium as gym

    if spec.lstrip().startswith("{"):
        return gym.make(gym.envs.registration.EnvSpec.from_json(spec))
    return gym.make(spec)


def check_eval_env(env_id: str) -> None:
    """Raises ValueError naming --eval-env if `env_id` is not a gymnasium id that can be made here (unknown ids,
    and mujoco-py based versions such as Hopper-v3, which gymnasium 1.x moved to gymnasium-robotics)."""
    import gymnasium as gym

    try:
        make_env(env_id).close()
    except (gym.error.Error, ImportError, ModuleNotFoundError, TypeError, ValueError) as e:
        names = ", ".join(f"{s.gym_id} / {s.gym_id.rsplit('-', 1)[0]}-v4" for s in ENVS.values())
        raise ValueError(f"--eval-env {env_id!r} cannot be made here ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"use a gymnasium id such as {names}.") from None


def describe_env(spec: str) -> dict:
    """{"id", "kwargs", "max_episode_steps"} of an id or EnvSpec JSON (for results and reports)."""
    if spec.lstrip().startswith("{"):
        d = json.loads(spec)
        return {"id": d.get("id"), "kwargs": d.get("kwargs", {}), "max_episode_steps": d.get("max_episode_steps")}
    import gymnasium as gym
    s = gym.spec(spec)
    return {"id": s.id, "kwargs": dict(s.kwargs), "max_episode_steps": s.max_episode_steps}


def check_shapes(spec: str, obs_dim: int, act_dim: int, source: str = "dataset") -> None:
    """Raises before training if the evaluation env's observation/action shapes differ from the data's."""
    env = make_env(spec)
    try:
        o, a = env.observation_space.shape, env.action_space.shape
    finally:
        env.close()
    if o != (obs_dim,) or a != (act_dim,):
        raise ValueError(
            f"{source}: observations [{obs_dim}] / actions [{act_dim}] do not fit the evaluation environment "
            f"{describe_env(spec)['id']} (observation space {o}, action space {a}). The data was recorded in another "
            f"environment or with other settings: for a D4RL file pass its environment with --env (hopper, walker2d, "
            f"halfcheetah; else it is read from the file name); --eval-env only picks another version of the same "
            f"environment (e.g. Hopper-v4); for a Minari dataset fix its env spec.")


def versions() -> dict:
    """Versions that decide simulated returns and training numerics (stored in every result.json)."""
    import gymnasium
    import mujoco
    import numpy
    import torch
    out = {"mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "torch": torch.__version__,
           "numpy": numpy.__version__}
    try:
        import minari
        out["minari"] = minari.__version__
    except ImportError:  # minari is only needed for Minari datasets
        pass
    return out


def normalized_score(env: str | EnvSpec, episode_return):
    """D4RL normalised score: 100 * (return - random) / (expert - random). Works on floats and numpy arrays."""
    spec = env if isinstance(env, EnvSpec) else get_env(env)
    return 100.0 * (episode_return - spec.ref_min) / (spec.ref_max - spec.ref_min)


USER_ERRORS = (ValueError, KeyError, FileNotFoundError)  # bad input / settings: one line, no traceback


def exit_on_user_error(e: BaseException):
    """The command-line scripts' answer to bad input: one `error: ...` line on stderr (our checks put the field and
    the fix in the message) and exit status 2; with IWSFT_TRACEBACK=1 the exception propagates with its traceback."""
    if os.environ.get("IWSFT_TRACEBACK"):
        raise e
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg} (set IWSFT_TRACEBACK=1 for the traceback)", file=sys.stderr)
    raise SystemExit(2)
