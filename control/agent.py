"""The behaviour agents: stable-baselines3 PPO, saved along the way as small numpy policy snapshots.

Hyperparameters per environment (``HYPERPARAMS``): Hopper uses SB3's PPO defaults (its shipped snapshots were trained
so); Walker2d and HalfCheetah use rl-zoo3's tuned PPO settings for ``Walker2d-v4`` / ``HalfCheetah-v4``
(rl_zoo3 2.9.2, hyperparams/ppo.yml), including their observation normalisation (``VecNormalize``), whose running
mean/variance at each snapshot are stored in the snapshot. PPO rather than rl-zoo3's SAC/TD3: on one CPU core SB3's
SAC runs ~40 environment steps/s (one 256x256 gradient step per environment step), so reaching D4RL's "medium" level
would take hours; tuned PPO runs ~300-500 steps/s here. Measured to D4RL's "medium" level on one core (2026-11-30):
HalfCheetah 1M steps ~45 CPU-min; Walker2d was trained to 1.6M steps (~285 steps/s, so ~95 CPU-min at that rate) and its shipped run stops early
at 1,228,800 steps, the snapshot that evaluated best (PPO's score oscillated and ended at normalised 37.5, below
"medium"; agent.json records the evaluations), as D4RL's medium policies were early-stopped.

Training is resumable (the SB3 checkpoint and normaliser are kept under --workdir); the snapshots go to
control/assets/<env>/ and are all that `control.data` needs to rebuild the datasets on a fresh machine. Next to them
``agent.json`` records the run (environment, hyperparameter source, seed, steps asked for and done, versions) and
whether its training finished: it is written with ``"finished": false`` when training starts and rewritten with
``"finished": true`` after the last snapshot, and `control.data` refuses to build from snapshots of an agent without a
finished record (``check_agent_finished``) unless told to (``--allow-unfinished-agent``).

    OMP_NUM_THREADS=1 python -m control.agent --env hopper                       # 300k steps (shipped)
    OMP_NUM_THREADS=1 python -m control.agent --env walker2d                     # rl-zoo3 tuned PPO
    OMP_NUM_THREADS=1 python -m control.agent --env halfcheetah
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from control.envs import get_env, normalized_score

ASSETS = Path(__file__).resolve().parent / "assets"

# PPO settings per environment. "zoo" entries are rl-zoo3 2.9.2's tuned values (hyperparams/ppo.yml, the -v4 envs);
# total_steps / snapshot_every are ours: stop when the agent is at D4RL's "medium" level, ~12-30 snapshots.
HYPERPARAMS = {
    "hopper": dict(total_steps=300_000, snapshot_every=10_240, normalize=False, half=False, ppo={},
                   source="SB3 PPO defaults"),
    "walker2d": dict(
        source="rl-zoo3 2.9.2 hyperparams/ppo.yml (Walker2d-v4)",
        total_steps=1_228_800, snapshot_every=51_200, normalize=True, half=False,  # stopped early: agent.json
        ppo=dict(batch_size=32, n_steps=512, gamma=0.99, learning_rate=5.05041e-05, ent_coef=0.000585045,
                 clip_range=0.1, n_epochs=20, gae_lambda=0.95, max_grad_norm=1.0, vf_coef=0.871923)),
    "halfcheetah": dict(
        source="rl-zoo3 2.9.2 hyperparams/ppo.yml (HalfCheetah-v4)",
        total_steps=1_000_000, snapshot_every=51_200, normalize=True, half=True,  # 256x256 nets: fp16 snapshots
        ppo=dict(batch_size=64, n_steps=512, gamma=0.98, learning_rate=2.0633e-05, ent_coef=0.000401762,
                 clip_range=0.1, n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8, vf_coef=0.58096,
                 policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation_fn="relu",
                                    net_arch=dict(pi=[256, 256], vf=[256, 256])))),
}


@dataclass
class AgentConfig:
    env: str = "hopper"  # environment short name (control.envs.ENVS)
    total_steps: Optional[int] = None  # environment steps in total (resuming counts earlier ones); None: HYPERPARAMS
    snapshot_every: Optional[int] = None  # steps between snapshots (best a multiple of n_steps); None: HYPERPARAMS
    seed: int = 0  # PPO seed
    workdir: str = "runs/agents"  # where the resumable SB3 checkpoint lives (not shipped)
    assets: str = str(ASSETS)  # where the snapshots go (shipped)


class SnapshotPolicy:
    """Numpy forward of an SB3 PPO MlpPolicy actor: [obs normalisation] -> MLP (tanh or relu) -> mean action,
    state-independent log-std. Snapshots without normalisation/activation fields are tanh and unnormalised."""

    def __init__(self, path: str | Path):
        z = np.load(path)
        n = sum(1 for k in z.files if k.startswith("w"))
        self.layers = [(z[f"w{i}"].astype(np.float32), z[f"b{i}"].astype(np.float32)) for i in range(n)]
        self.std = np.exp(z["log_std"].astype(np.float32))
        activation = str(z["activation"]) if "activation" in z.files else "tanh"  # older snapshots: tanh
        self.act_fn = np.tanh if activation == "tanh" else (lambda x: np.maximum(x, 0.0))
        if "obs_mean" in z.files:  # SB3 VecNormalize: clip((obs - mean) / sqrt(var + eps), -clip, clip)
            self.obs_mean, self.obs_scale = z["obs_mean"], 1.0 / np.sqrt(z["obs_var"] + float(z["obs_eps"]))
            self.obs_clip = float(z["obs_clip"])
        else:
            self.obs_mean = None
        self.steps = int(z["steps"])
        self.train_return = float(z["train_return"])
        self.path = Path(path)

    def mean(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float64)
        if self.obs_mean is not None:
            h = np.clip((h - self.obs_mean) * self.obs_scale, -self.obs_clip, self.obs_clip)
        h = h.astype(np.float32)
        for w, b in self.layers[:-1]:
            h = self.act_fn(h @ w.T + b)
        w, b = self.layers[-1]
        return h @ w.T + b

    def act(self, obs: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Stochastic action (as PPO explores) if rng is given, else the mean; clipped to [-1, 1] like SB3 does."""
        a = self.mean(obs)
        if rng is not None:
            a = a + self.std * rng.standard_normal(a.shape).astype(np.float32)
        return np.clip(a, -1.0, 1.0)


def list_snapshots(env: str, assets: str | Path = ASSETS) -> list[Path]:
    """The snapshots of an environment, in training order."""
    d = Path(assets) / get_env(env).name
    snaps = sorted(d.glob("snap_*.npz"))
    if not snaps:
        raise FileNotFoundError(
            f"no behaviour-policy snapshots in {d}: train them with `python -m control.agent --env {env}` "
            f"(resumable) or use a Minari/D4RL dataset instead"
        )
    return snaps


AGENT_RECORD = "agent.json"  # in <assets>/<env>/, next to the snapshots


def agent_record(env: str, assets: str | Path = ASSETS) -> dict | None:
    """The run record `train_agent` keeps in <assets>/<env>/agent.json (None when there is none).
    Raises ValueError if the file is not a JSON object."""
    p = Path(assets) / get_env(env).name / AGENT_RECORD
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); delete it and finish the agent's training with "
                         f"`{_train_command(env, assets)}` (resumable), which rewrites it") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{p} must hold a JSON object (the agent's run record), got {type(rec).__name__}")
    return rec


def _train_command(env: str, assets: str | Path) -> str:
    cmd = f"python -m control.agent --env {get_env(env).name}"
    return cmd if Path(assets).resolve() == ASSETS.resolve() else f"{cmd} --assets {assets}"


def _snapshot_steps(path: Path) -> int:
    with np.load(path) as z:
        return int(z["steps"])


def check_agent_finished(env: str, assets: str | Path = ASSETS) -> dict:
    """The run record of the agent whose snapshots are in <assets>/<env>/, if its training finished.

    Finished means: agent.json exists, says ``"finished": true``, and names the last snapshot in the folder as its
    final one (so snapshots added by a later, unfinished run are not mistaken for the finished agent).
    Raises FileNotFoundError when there are no snapshots (list_snapshots), ValueError otherwise, naming the steps
    done out of the steps asked for and the command that finishes the training."""
    name = get_env(env).name
    snaps = list_snapshots(name, assets)
    last = snaps[-1]
    rec = agent_record(name, assets)
    d = last.parent
    fix = (f"Finish the training with `{_train_command(name, assets)}` (resumable), or pass "
           f"--allow-unfinished-agent (control.data.build(..., allow_unfinished_agent=True)) to build from these "
           f"snapshots anyway.")
    if rec is None or rec.get("finished") is not True:
        total = (rec or {}).get("total_steps") or HYPERPARAMS[name]["total_steps"]
        why = f"no {AGENT_RECORD} recording a finished run" if rec is None else f"{AGENT_RECORD} says unfinished"
        what = ("unfinished" if _snapshot_steps(last) < int(total) else
                "not recorded as finished (it may have been stopped before its record was written)")
        raise ValueError(
            f"{d}: the behaviour agent's training is {what}: its last snapshot ({last.name}) is at "
            f"{_snapshot_steps(last):,} of {int(total):,} steps ({why}), so a dataset built from it would not be "
            f"what its kind says. {fix}")
    if rec.get("final_snapshot") != last.name:
        raise ValueError(
            f"{d}: {AGENT_RECORD} records a finished run ending at {rec.get('final_snapshot')!r}, but the last "
            f"snapshot here is {last.name} ({_snapshot_steps(last):,} steps): the snapshots changed after that run "
            f"finished. {fix}")
    return rec


def _write_record(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".json.tmp")  # never leave half a record: write, then rename
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    tmp.replace(path)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("stable-baselines3", "gymnasium", "mujoco", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _save_snapshot(model, steps: int, out_dir: Path, vecnorm=None, half: bool = False) -> Path:
    """Writes the actor of `model` (and the observation normaliser `vecnorm`, if any) as snap_<steps>.npz."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.policy.state_dict().items()}
    hidden = sorted(int(k.split(".")[2]) for k in sd if k.startswith("mlp_extractor.policy_net.") and k.endswith("weight"))
    ws = [sd[f"mlp_extractor.policy_net.{i}.weight"] for i in hidden] + [sd["action_net.weight"]]
    bs = [sd[f"mlp_extractor.policy_net.{i}.bias"] for i in hidden] + [sd["action_net.bias"]]
    dt = np.float16 if half else np.float32
    act = model.policy.mlp_extractor.policy_net[1].__class__.__name__.lower()  # "tanh" / "relu"
    extra = {}
    if vecnorm is not None:
        extra = dict(obs_mean=vecnorm.obs_rms.mean.astype(np.float64), obs_var=vecnorm.obs_rms.var.astype(np.float64),
                     obs_eps=np.float64(vecnorm.epsilon), obs_clip=np.float64(vecnorm.clip_obs))
    rets = [ep["r"] for ep in model.ep_info_buffer] if model.ep_info_buffer else [float("nan")]
    path = out_dir / f"snap_{steps:08d}.npz"
    np.savez_compressed(
        path, **{f"w{i}": w.astype(dt) for i, w in enumerate(ws)}, **{f"b{i}": b.astype(dt) for i, b in enumerate(bs)},
        log_std=sd["log_std"], activation=np.array(act), steps=np.int64(steps),
        train_return=np.float64(np.mean(rets)), **extra,
    )
    return path


def train_agent(cfg: AgentConfig) -> list[Path]:
    """Trains (or resumes) the PPO agent of `cfg.env`, writing snapshots to <assets>/<env>/ and the run record
    <assets>/<env>/agent.json ("finished": false while training, true after the last snapshot). Returns the
    snapshots in training order."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)
    spec = get_env(cfg.env)
    hp = HYPERPARAMS[spec.name]
    for flag, val in (("--total-steps", cfg.total_steps), ("--snapshot-every", cfg.snapshot_every)):
        if val is not None and val < 1:
            raise ValueError(f"{flag} {val}: must be >= 1 (leave it out for {spec.name}'s default, "
                             f"{hp[flag[2:].replace('-', '_')]:,})")
    total = cfg.total_steps if cfg.total_steps is not None else hp["total_steps"]
    every = cfg.snapshot_every if cfg.snapshot_every is not None else hp["snapshot_every"]
    out_dir = Path(cfg.assets) / spec.name
    ckpt = Path(cfg.workdir) / spec.name / "ppo.zip"
    old_snaps = sorted(out_dir.glob("snap_*.npz"))
    if old_snaps and not ckpt.exists():  # a fresh run would add its snapshots to another run's: refuse
        raise ValueError(
            f"--assets {cfg.assets}: {out_dir} already holds {len(old_snaps)} snapshots of another run (and "
            f"{ckpt} has no checkpoint to resume): a new run's snapshots would mix with them and datasets would use "
            f"both. Train into an empty --assets folder, delete those snapshots, or point --workdir at the "
            f"checkpoint of the run that made them to resume it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    norm_path = ckpt.with_name("vecnormalize.pkl")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    env = DummyVecEnv([lambda: Monitor(gym.make(spec.gym_id))])
    if hp["normalize"]:
        env = VecNormalize.load(str(norm_path), env) if norm_path.exists() else VecNormalize(env)
    kw = dict(hp["ppo"])
    if "policy_kwargs" in kw:
        pk = dict(kw["policy_kwargs"])
        pk["activation_fn"] = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[pk["activation_fn"]]
        kw["policy_kwargs"] = pk
    if ckpt.exists():
        model = PPO.load(ckpt, env=env, device="cpu")
        print(f"resuming from {ckpt} at {model.num_timesteps} steps", flush=True)
    else:
        model = PPO("MlpPolicy", env, seed=cfg.seed, device="cpu", verbose=0, **kw)
    vecnorm = env if hp["normalize"] else None
    t0, c0 = time.time(), time.process_time()

    def checkpoint(n: int) -> Path:
        p = _save_snapshot(model, n, out_dir, vecnorm, hp["half"])
        model.save(ckpt)
        if vecnorm is not None:
            vecnorm.save(str(norm_path))
        ret = float(np.mean([e["r"] for e in model.ep_info_buffer])) if model.ep_info_buffer else float("nan")
        print(json.dumps({"steps": n, "train_return": round(ret, 1),
                          "train_score": round(float(normalized_score(spec, ret)), 1), "snapshot": p.name,
                          "elapsed_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}),
              flush=True)
        return p

    class Snapshots(BaseCallback):
        def _on_rollout_start(self) -> None:  # called after each policy update, before collecting again
            n, rollout = self.model.num_timesteps, self.model.n_steps * self.model.n_envs
            # first rollout boundary past each multiple (a resumed run starts on the one it saved last)
            if n > 0 and n % every < rollout and not (out_dir / f"snap_{n:08d}.npz").exists():
                checkpoint(n)

        def _on_step(self) -> bool:
            return True

    record_path = out_dir / AGENT_RECORD
    seed = model.seed if getattr(model, "seed", None) is not None else cfg.seed  # a resumed run keeps its own seed
    record = dict(env=spec.name, gym_id=spec.gym_id, algorithm="stable-baselines3 PPO, MlpPolicy",
                  hyperparams_source=hp.get("source", "control.agent.HYPERPARAMS"), ppo=hp["ppo"],
                  normalize=hp["normalize"], seed=seed, total_steps=int(total), snapshot_every=int(every),
                  steps_done=int(model.num_timesteps), finished=False, workdir=str(ckpt.parent), versions=_versions())
    remaining = total - model.num_timesteps
    if remaining > 0:
        # unfinished until the last snapshot is written: an interrupted run leaves "finished": false behind
        _write_record(record_path, record)
        model.learn(remaining, callback=Snapshots(), reset_num_timesteps=False)
    elif (rec := agent_record(spec.name, cfg.assets)) and rec.get("finished") is True:
        snaps = list_snapshots(cfg.env, cfg.assets)
        if rec.get("final_snapshot") == snaps[-1].name:
            return snaps  # already finished and recorded: nothing to do
    if not (out_dir / f"snap_{model.num_timesteps:08d}.npz").exists():
        checkpoint(model.num_timesteps)
    snaps = list_snapshots(cfg.env, cfg.assets)
    _write_record(record_path, {**record, "steps_done": int(model.num_timesteps), "snapshots": len(snaps),
                                "final_snapshot": snaps[-1].name, "finished": True})
    return snaps


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    d = AgentConfig()
    p.add_argument("--env", default=d.env, help="environment to train the behaviour agent in (hopper, walker2d, "
                                                "halfcheetah)")
    p.add_argument("--total-steps", type=int, default=None, help="environment steps in total; default: per "
                                                                 "environment (HYPERPARAMS)")
    p.add_argument("--snapshot-every", type=int, default=None, help="steps between snapshots; default: per "
                                                                    "environment (HYPERPARAMS)")
    p.add_argument("--seed", type=int, default=d.seed, help="PPO seed (a resumed run keeps its own)")
    p.add_argument("--workdir", default=d.workdir, help="where the resumable SB3 checkpoint is kept (<workdir>/<env>/)")
    p.add_argument("--assets", default=d.assets, help="where the snapshots and agent.json go (<assets>/<env>/)")
    a = p.parse_args(argv)
    from control.envs import USER_ERRORS, exit_on_user_error
    try:
        snaps = train_agent(AgentConfig(a.env, a.total_steps, a.snapshot_every, a.seed, a.workdir, a.assets))
    except USER_ERRORS as e:
        exit_on_user_error(e)
    print(f"{len(snaps)} snapshots in {snaps[0].parent}")


if __name__ == "__main__":
    main()
