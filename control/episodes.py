"""One episode representation for every dataset: flat step arrays plus episode offsets (no padding).

Episode e owns steps `offsets[e]:offsets[e+1]` of `observations`, `actions` and `rewards`. Loaders:
  load_minari(id_or_path)  a Minari dataset by id (local, MINARI_DATASETS_PATH) or by directory
  load_d4rl_hdf5(path)     a D4RL-format HDF5 file (observations, actions, rewards, terminals, timeouts); episodes
                           whose time-limit end is not marked are split (step limit, next_observations gaps)
  save_minari(...)         writes Episodes as a Minari dataset (create_dataset_from_buffers)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from control.envs import EnvSpec, get_env, normalized_score


@dataclass
class Episodes:
    observations: np.ndarray  # [N, obs_dim] float32, the observation each action was taken in
    actions: np.ndarray  # [N, act_dim] float32
    rewards: np.ndarray  # [N] float32
    offsets: np.ndarray  # [E+1] int64, episode e is steps offsets[e]:offsets[e+1]
    terminated: np.ndarray  # [E] bool, the episode ended in a terminal state (not a time limit)
    env: str | None = None  # environment short name (control.envs), used for normalised scores and evaluation
    source: str = ""  # where the data came from (for logs and reports)
    eval_env: str | None = None  # gymnasium id or EnvSpec JSON to evaluate in (None: the short name's default id)
    splits: dict | None = None  # loaders: how many unmarked episode ends were split, by cause (reported in summary)
    eval_warning: str | None = None  # loaders: why scores in eval_env may not be comparable (--eval-env override)

    def __post_init__(self):
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.terminated = np.asarray(self.terminated, dtype=bool)
        self.validate()

    # ---- shape of the data
    @property
    def num_episodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_steps(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode [E] (float64)."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.offsets[:-1]) if self.num_episodes else np.zeros(0)

    def validate(self) -> None:
        n = len(self.observations)
        if self.offsets.ndim != 1 or len(self.offsets) < 2 or self.offsets[0] != 0 or self.offsets[-1] != n:
            raise ValueError(f"offsets must run from 0 to the number of steps ({n}); got {self.offsets[:3]}...{self.offsets[-2:]}")
        if np.any(np.diff(self.offsets) <= 0):
            raise ValueError("every episode must have at least one step (offsets must be strictly increasing)")
        for name, arr in (("actions", self.actions), ("rewards", self.rewards)):
            if len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} steps but observations has {n}")
        if len(self.terminated) != self.num_episodes:
            raise ValueError(f"terminated has {len(self.terminated)} entries for {self.num_episodes} episodes")
        for name, arr in (("observations", self.observations), ("actions", self.actions), ("rewards", self.rewards)):
            bad = ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
            if bad.any():
                first = int(np.argmax(bad))
                ep = int(np.searchsorted(self.offsets, first, side="right") - 1)
                raise ValueError(
                    f"{self.source or 'dataset'}: field {name!r} has NaN/inf values at {int(bad.sum())} steps "
                    f"(first: episode {ep}, step {first - self.offsets[ep]}). Fix the source data, or drop those "
                    f"episodes with drop_nonfinite=True in the loader (CLI: --drop-nonfinite)."
                )

    def select(self, mask_or_index) -> "Episodes":
        """A new Episodes holding the chosen episodes (bool mask [E] or integer indices), in the given order."""
        idx = np.asarray(mask_or_index)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
        if len(idx) == 0:
            raise ValueError(f"{self.source or 'dataset'}: the selection is empty (no episode passed the filter); "
                             "use a larger fraction or check the dataset's returns")
        steps = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        return Episodes(self.observations[steps], self.actions[steps], self.rewards[steps],
                        np.concatenate([[0], np.cumsum(self.lengths[idx])]), self.terminated[idx], self.env, self.source,
                        self.eval_env, self.splits, self.eval_warning)

    def normalized_returns(self) -> np.ndarray:
        return normalized_score(self.env, self.returns)

    def summary(self) -> dict:
        r = self.returns
        out = {"source": self.source, "env": self.env, "episodes": self.num_episodes, "steps": self.num_steps,
               "return_mean": float(r.mean()), "return_min": float(r.min()), "return_max": float(r.max())}
        if self.env is not None:
            nr = self.normalized_returns()
            out.update(score_mean=float(nr.mean()), score_max=float(nr.max()))
        if self.eval_env is not None:
            from control.envs import describe_env
            out["eval_env"] = describe_env(self.eval_env)
        if self.splits is not None:
            out["split_episodes"] = dict(self.splits)
        if self.eval_warning is not None:  # only then: summaries of data without an override are unchanged
            out["eval_warning"] = self.eval_warning
        out["content_sha256"] = self.content_hash()
        return out

    def content_hash(self) -> str:
        """sha256 (first 16 hex digits) of the arrays trained on (observations, actions, rewards, episode offsets,
        terminals, with dtypes and shapes): two datasets with the same name and summary but other contents differ."""
        h = hashlib.sha256()
        for a in (self.observations, self.actions, self.rewards, self.offsets, self.terminated):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]


def _from_lists(obs, act, rew, term, env, source, drop_nonfinite=False, eval_env=None, splits=None,
                eval_warning=None) -> Episodes:
    """Builds Episodes from per-episode arrays, optionally dropping episodes with NaN/inf values.

    Warns (UserWarning) how many episodes `drop_nonfinite` dropped, and how many steps have actions outside
    [-1, 1] (ACTION_LOW, ACTION_HIGH), with the range seen. Raises ValueError when there is no episode, or when
    `drop_nonfinite` drops all of them."""
    import warnings

    if drop_nonfinite:
        keep = [i for i in range(len(obs)) if all(np.isfinite(x).all() for x in (obs[i], act[i], rew[i]))]
        dropped = len(obs) - len(keep)
        if obs and not keep:
            raise ValueError(f"{source}: all {len(obs)} episodes had NaN/inf values in observations, actions or "
                             f"rewards, so --drop-nonfinite (drop_nonfinite=True) dropped every one; fix the source "
                             f"data.")
        if dropped:
            kept = set(keep)
            n_steps = sum(len(rew[i]) for i in range(len(rew)) if i not in kept)
            warnings.warn(f"{source}: --drop-nonfinite dropped {dropped} of {len(obs)} episodes ({n_steps} steps) "
                          f"with NaN/inf values; {len(keep)} episodes remain.", UserWarning, stacklevel=3)
        obs, act, rew, term = [obs[i] for i in keep], [act[i] for i in keep], [rew[i] for i in keep], [term[i] for i in keep]
    if not obs:
        raise ValueError(f"{source}: no episodes to load")
    _warn_actions_out_of_range(act, source)
    lengths = [len(r) for r in rew]
    return Episodes(np.concatenate(obs), np.concatenate(act), np.concatenate(rew),
                    np.concatenate([[0], np.cumsum(lengths)]), np.array(term, dtype=bool), env, source, eval_env, splits,
                    eval_warning)


# The MuJoCo locomotion tasks here (Hopper, Walker2d, HalfCheetah) all have the action space Box(-1, 1); the policy's
# mean is tanh-squashed (control.policy), so it can never produce actions outside it.
ACTION_LOW, ACTION_HIGH = -1.0, 1.0
ACTION_TOL = 1e-6  # float32 round-off of a clipped 1.0 is not a violation


def _warn_actions_out_of_range(act: list, source: str) -> None:
    """UserWarning naming how many steps have an action entry outside [ACTION_LOW, ACTION_HIGH] and the range seen.
    Non-finite entries are left to Episodes.validate (which names them)."""
    import warnings

    a = np.concatenate([np.asarray(x).reshape(len(x), -1) for x in act])  # [N, act_dim]
    finite = np.isfinite(a)
    fin = np.where(finite, a, 0.0)
    bad = ((fin < ACTION_LOW - ACTION_TOL) | (fin > ACTION_HIGH + ACTION_TOL)).any(axis=1)  # [N]
    if bad.any():
        lo, hi = float(a[finite].min()), float(a[finite].max())
        warnings.warn(f"{source}: {int(bad.sum())} of {len(a)} steps have actions outside the action space "
                      f"[{ACTION_LOW:g}, {ACTION_HIGH:g}] (range seen: [{lo:.4g}, {hi:.4g}]); the policy's tanh mean "
                      f"cannot reach them, so fitting them pushes the mean to the edge and widens the std (and the "
                      f"environment clips them anyway). Clip or rescale the actions to [-1, 1] if they are in other "
                      f"units.", UserWarning, stacklevel=4)


def _check_env_override(env: str | None, recorded: str | None, source: str) -> None:
    """Raises if `env` (--env) names another environment than the one the dataset records: scores would be
    normalised with the wrong D4RL reference returns and evaluated in the wrong simulator."""
    if env is None or recorded is None:
        return
    try:
        rec = get_env(str(recorded)).name
    except ValueError:  # the dataset names an environment we have no reference scores for: --env decides
        return
    if get_env(env).name != rec:
        raise ValueError(f"{source}: --env {env!r} contradicts the dataset's own environment {str(recorded)!r}; "
                         f"drop --env (the dataset's environment is used) or pass the dataset of {env!r}.")


def _env_from_spec_id(env_id: str | None, source: str) -> str:
    if env_id is None:
        raise ValueError(f"{source}: the dataset does not say which environment it comes from; pass --env")
    return get_env(env_id).name


def load_minari(dataset: str | Path, env: str | None = None, drop_nonfinite: bool = False,
                eval_env: str | None = None) -> Episodes:
    """Loads a Minari dataset by id ("mujoco/hopper/medium-v0", looked up in MINARI_DATASETS_PATH or ~/.minari)
    or by directory (the dataset folder or its `data/` subfolder). `env` overrides the environment it names.

    The evaluation environment is the dataset's own: `recover_environment(eval_env=True)` (its eval spec if it has
    one, else the recording spec), kept with all its kwargs as EnvSpec JSON; `eval_env` (an id) overrides it."""
    import minari

    p = Path(dataset)
    if p.is_dir():
        data_dir = p / "data" if (p / "data" / "metadata.json").exists() else p
        if not (data_dir / "metadata.json").exists():
            raise FileNotFoundError(f"{p} is not a Minari dataset directory (no metadata.json in it or in data/)")
        ds = minari.MinariDataset(data_dir)
    else:
        local = minari.list_local_datasets()
        if str(dataset) not in local:
            raise FileNotFoundError(
                f"Minari dataset {dataset!r} not found locally (root: {minari.storage.get_dataset_path()}). "
                f"Download it with `minari download {dataset}`, set MINARI_DATASETS_PATH, build one with "
                f"`python -m control.data build`, or pass a dataset directory. Local datasets: {sorted(local)}"
            )
        ds = minari.load_dataset(str(dataset))
    spec = ds.spec.env_spec
    _check_env_override(env, spec.id if spec is not None else None, f"minari:{dataset}")
    env_name = get_env(env).name if env else _env_from_spec_id(spec.id if spec is not None else None, str(dataset))
    eval_warning = None
    if spec is not None:
        import warnings
        with warnings.catch_warnings():  # Minari warns about unmet `requirements` pins; the shape check decides
            warnings.simplefilter("ignore")
            e = ds.recover_environment(eval_env=True)
        try:
            own = e.spec.to_json()
        except ValueError:  # kwargs that JSON cannot hold (callables): fall back to the id (+ registered defaults)
            own = e.spec.id
        finally:
            e.close()
        if eval_env is not None:
            eval_env, eval_warning = _warned(_override_minari_eval_env, eval_env, own, env_name, str(dataset))
        else:
            eval_env = own
    obs, act, rew, term = [], [], [], []
    for ep in ds.iterate_episodes():
        o = ep.observations
        if isinstance(o, dict):
            raise ValueError(f"{dataset}: dict observations are not supported (flat Box observations only)")
        T = len(ep.rewards)
        obs.append(np.asarray(o)[:T])  # Minari stores T+1 observations (the final one too); keep those acted in
        act.append(np.asarray(ep.actions)[:T])
        rew.append(np.asarray(ep.rewards))
        term.append(bool(np.asarray(ep.terminations)[-1]))
    return _from_lists(obs, act, rew, term, env_name, f"minari:{dataset}", drop_nonfinite, eval_env,
                       eval_warning=eval_warning)


def _warned(fn, *args, **kwargs):
    """(fn(...), the text of the UserWarnings it raised or None); the warnings are shown too (the table repeats them)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = fn(*args, **kwargs)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for m in msgs:
        warnings.warn(m, UserWarning, stacklevel=3)
    return out, (" ".join(msgs) or None)


def _override_minari_eval_env(override: str, own: str, env_name: str, source: str) -> str:
    """--eval-env on a Minari dataset. The same id as the dataset's evaluation spec keeps that spec (its kwargs
    and step limit); another id is built with its registered defaults, with a warning naming the kwargs / step limit
    dropped and, when the version differs, that scores are not comparable. Raises for another environment."""
    import warnings

    from control.envs import describe_env, gym_id_version
    if get_env(override).name != env_name:
        raise ValueError(f"{source}: --eval-env {override!r} is not an environment of {env_name!r} (the dataset's "
                         f"is {describe_env(own)['id']}); drop --eval-env or pass an id of {env_name!r}.")
    d = describe_env(own)
    if override == d["id"]:
        return own  # same environment: keep the dataset's kwargs and step limit
    new = describe_env(override)
    dropped = {k: v for k, v in d["kwargs"].items() if new["kwargs"].get(k) != v}
    msg = f"{source}: evaluating in {override} instead of the dataset's {d['id']}"
    if gym_id_version(override) != gym_id_version(d["id"]):
        msg += (f"; its version differs ({gym_id_version(override)} vs {gym_id_version(d['id'])}), so dynamics/reward "
                f"may differ and scores are not comparable with the dataset's")
    if dropped:
        msg += f"; the dataset's env kwargs {dropped} are dropped ({override}'s registered defaults are used)"
    if new["max_episode_steps"] != d["max_episode_steps"]:
        msg += f"; step limit {new['max_episode_steps']} instead of the dataset's {d['max_episode_steps']}"
    if msg != f"{source}: evaluating in {override} instead of the dataset's {d['id']}":
        warnings.warn(msg + ".", UserWarning, stacklevel=3)
    return override


D4RL_FIELDS = ("observations", "actions", "rewards", "terminals", "timeouts")


def split_unmarked_ends(ends: np.ndarray, n: int, max_steps: int | None, next_obs: np.ndarray | None = None,
                        obs: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Adds episode ends that a file failed to mark (D4RL v0/v1 files miss some `timeouts`).

    ends: sorted exclusive end offsets [K] with ends[-1] == n. A step t (not already an end) also ends an episode
      - where `next_obs[t]` differs from `obs[t+1]` (the next step does not continue this one; entries that are
        NaN/inf on either side are ignored, so non-finite values never add an end), and
      - every `max_steps` steps of a run that is still longer than the environment's step limit (a time-limit end).
    Returns (new ends, {"discontinuity": count, "time_limit": count}) — counts of added ends.
    """
    ends = np.asarray(ends, dtype=np.int64)
    added = {"discontinuity": 0, "time_limit": 0}
    if next_obs is not None and obs is not None and n > 1:
        a, b = next_obs[:-1], obs[1:]
        # a NaN/inf never compares equal: such entries are not evidence of a gap (the non-finite check reports them,
        # and must locate them in the file's real episodes, so they must not split one)
        close = np.isclose(a, b, rtol=1e-5, atol=1e-6) | ~np.isfinite(a) | ~np.isfinite(b)
        same = close.all(axis=1)  # [n-1], t continues into t+1
        gaps = np.flatnonzero(~same) + 1  # exclusive end after step t
        gaps = np.setdiff1d(gaps, ends)
        added["discontinuity"] = int(len(gaps))
        ends = np.union1d(ends, gaps)
    if max_steps:
        starts = np.concatenate([[0], ends[:-1]])
        cuts = [np.arange(s + max_steps, e, max_steps) for s, e in zip(starts, ends) if e - s > max_steps]
        if cuts:
            cuts = np.concatenate(cuts)
            added["time_limit"] = int(len(cuts))
            ends = np.union1d(ends, cuts)
    return ends.astype(np.int64), added


def load_d4rl_hdf5(path: str | Path, env: str | None = None, drop_nonfinite: bool = False,
                   eval_env: str | None = None, max_episode_steps: int | None = None) -> Episodes:
    """Loads a D4RL-format HDF5 file. Episodes end at `terminals | timeouts`; a trailing unfinished episode is kept.
    The environment comes from `env`, the file's `env_name` attribute/metadata, or its file name (hopper_...).

    Evaluation env: `<Env>-v4` (control.envs.eval_id_for_d4rl: D4RL files were recorded in -v3, which gymnasium 1.x
    lacks; -v4 is the same model with the new bindings); `eval_env` overrides it (warning if the version differs).
    Unmarked ends are split (split_unmarked_ends) at `next_observations` gaps (if the file has that field) and at the
    env's step limit (`max_episode_steps`, default the eval env's, 1000 for MuJoCo); the counts are in `splits`."""
    import h5py

    from control.envs import describe_env, eval_id_for_d4rl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"D4RL file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a D4RL HDF5 file (a Minari dataset directory goes to "
                         f"--dataset, a D4RL .hdf5 file to --d4rl-file)")
    if not h5py.is_hdf5(path):  # h5py's own error would be "file signature not found"
        raise ValueError(f"{path.name}: not an HDF5 file (no HDF5 signature; {path.stat().st_size} bytes at {path}). "
                         f"--d4rl-file takes a D4RL-format .hdf5 file (fields {list(D4RL_FIELDS)}); a truncated "
                         f"download also looks like this: download it again.")
    with h5py.File(path, "r") as f:
        missing = [k for k in D4RL_FIELDS if k not in f]
        if missing == ["timeouts"]:
            raise ValueError(
                f"{path}: no 'timeouts' field, so episode boundaries at the time limit are unknown (D4RL -v0 files "
                f"lack it). Use the -v2 file of this dataset, or add a boolean 'timeouts' array [N] (True at the "
                f"last step of every time-limited episode) to the file."
            )
        if missing:
            hint = " (D4RL -v0 files also lack 'timeouts': use the -v2 file)" if "timeouts" in missing else ""
            raise ValueError(f"{path}: missing D4RL field(s) {missing}; a D4RL file needs all of "
                             f"{list(D4RL_FIELDS)}, this one has {sorted(f.keys())}{hint}.")
        for k in D4RL_FIELDS:
            if not isinstance(f[k], h5py.Dataset) or f[k].ndim < 1:
                raise ValueError(f"{path}: {k!r} must be an array with one entry per step, not "
                                 f"{'a group' if not isinstance(f[k], h5py.Dataset) else 'a scalar'}.")
        data = {k: f[k][()] for k in D4RL_FIELDS}
        next_obs = f["next_observations"][()] if "next_observations" in f else None
        n = len(data["rewards"])
        for k in D4RL_FIELDS:
            if len(data[k]) != n:
                raise ValueError(f"{path}: field {k!r} has {len(data[k])} entries but 'rewards' has {n}; every D4RL "
                                 f"field must have one entry per step. Re-export the file.")
        if next_obs is not None and len(next_obs) != n:
            raise ValueError(f"{path}: field 'next_observations' has {len(next_obs)} entries but 'rewards' has {n}.")
        if n == 0:
            raise ValueError(f"{path.name}: the file holds 0 steps (every D4RL field is empty), so there is "
                             f"nothing to train on ({path}). Re-export the file with its data.")
        recorded = f.attrs.get("env_name") or (f["metadata/env_name"][()] if "metadata/env_name" in f else None)
    if isinstance(recorded, bytes):
        recorded = recorded.decode()
    _check_env_override(env, recorded, str(path))
    name = env or recorded
    if name is None:
        stem = path.stem.lower()
        name = next((k for k in ("halfcheetah", "hopper", "walker2d") if stem.startswith(k)), None)
    env_name = _env_from_spec_id(name, str(path))
    eval_id, eval_warning = _warned(eval_id_for_d4rl, env_name, override=eval_env)
    if max_episode_steps is None:
        max_episode_steps = describe_env(eval_id)["max_episode_steps"]
    term_flags = data["terminals"].astype(bool).reshape(-1)
    ends = np.flatnonzero(term_flags | data["timeouts"].astype(bool).reshape(-1)) + 1
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    ends, splits = split_unmarked_ends(ends, n, max_episode_steps, next_obs, data["observations"])
    if sum(splits.values()):
        import warnings
        warnings.warn(f"{path}: {sum(splits.values())} episode end(s) not marked in terminals/timeouts were added "
                      f"({splits}); see control.episodes.split_unmarked_ends.", UserWarning, stacklevel=2)
    starts = np.concatenate([[0], ends[:-1]])
    obs = [data["observations"][s:e] for s, e in zip(starts, ends)]
    act = [data["actions"][s:e] for s, e in zip(starts, ends)]
    rew = [data["rewards"][s:e].reshape(-1) for s, e in zip(starts, ends)]
    return _from_lists(obs, act, rew, [bool(term_flags[e - 1]) for e in ends], env_name, f"d4rl:{path.name}",
                       drop_nonfinite, eval_id, splits, eval_warning)


def write_d4rl_hdf5(episodes: Episodes, path: str | Path) -> None:
    """Writes Episodes in the D4RL HDF5 layout (used by tests and for interoperability)."""
    import h5py

    term = np.zeros(episodes.num_steps, dtype=bool)
    tout = np.zeros(episodes.num_steps, dtype=bool)
    last = episodes.offsets[1:] - 1
    term[last[episodes.terminated]] = True
    tout[last[~episodes.terminated]] = True
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"], f["rewards"] = episodes.observations, episodes.actions, episodes.rewards
        f["terminals"], f["timeouts"] = term, tout
        if episodes.env:
            f.attrs["env_name"] = episodes.env


def save_minari(episodes: Episodes, dataset_id: str, final_observations: np.ndarray, description: str = "",
                algorithm_name: str = "", spec: EnvSpec | None = None, env=None, eval_env=None):
    """Writes Episodes as a Minari dataset (in MINARI_DATASETS_PATH or ~/.minari) with D4RL reference scores.
    `final_observations` [E, obs_dim] is the observation after each episode's last step (Minari stores T+1).
    `env` / `eval_env` (a gymnasium id, EnvSpec or env, with kwargs) are recorded as the dataset's recording and
    evaluation environments; default: the short name's id (e.g. Hopper-v5)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    import warnings

    spec = spec or get_env(episodes.env)
    buffers = []
    for e in range(episodes.num_episodes):
        s, t = episodes.offsets[e], episodes.offsets[e + 1]
        T = t - s
        term = np.zeros(T, dtype=bool)
        trunc = np.zeros(T, dtype=bool)
        (term if episodes.terminated[e] else trunc)[-1] = True
        buffers.append(EpisodeBuffer(
            id=e, observations=np.concatenate([episodes.observations[s:t], final_observations[e][None]]).astype(np.float64),
            actions=episodes.actions[s:t], rewards=episodes.rewards[s:t].astype(np.float64),
            terminations=term, truncations=trunc))
    with warnings.catch_warnings():  # Minari nags about unset author e-mail / code link / eval env
        warnings.simplefilter("ignore", UserWarning)
        return minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env if env is not None else spec.gym_id, eval_env=eval_env,
            algorithm_name=algorithm_name or None, author="iwsft",
            ref_min_score=spec.ref_min, ref_max_score=spec.ref_max, description=description or None,
            requirements=["gymnasium[mujoco]>=1.0"])

