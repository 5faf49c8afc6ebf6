"""The behaviour agent: stable-baselines3 PPO, saved along the way as small numpy policy snapshots.

Training is resumable (a full SB3 checkpoint is kept under --workdir); the snapshots (a few tens of KB each) go to
control/assets/<env>/ and are all that `control.data` needs to rebuild the datasets on a fresh machine.

    OMP_NUM_THREADS=1 python -m control.agent --env hopper --total-steps 300000
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from control.envs import get_env

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class AgentConfig:
    env: str = "hopper"  # environment short name (control.envs.ENVS)
    total_steps: int = 300_000  # environment steps of PPO training in total (resuming counts earlier steps)
    snapshot_every: int = 10_240  # save a policy snapshot every this many steps (best a multiple of PPO's n_steps=2048)
    seed: int = 0  # PPO seed
    workdir: str = "runs/agents"  # where the resumable SB3 checkpoint lives (not shipped)
    assets: str = str(ASSETS)  # where the snapshots go (shipped)


class SnapshotPolicy:
    """Numpy forward of an SB3 MlpPolicy actor (tanh MLP -> mean, state-independent log-std)."""

    def __init__(self, path: str | Path):
        z = np.load(path)
        self.layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(3)]
        self.std = np.exp(z["log_std"])
        self.steps = int(z["steps"])
        self.train_return = float(z["train_return"])
        self.path = Path(path)

    def mean(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float32)
        for w, b in self.layers[:-1]:
            h = np.tanh(h @ w.T + b)
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


def _save_snapshot(model, steps: int, out_dir: Path) -> Path:
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.policy.state_dict().items()}
    rets = [ep["r"] for ep in model.ep_info_buffer] if model.ep_info_buffer else [float("nan")]
    path = out_dir / f"snap_{steps:08d}.npz"
    np.savez_compressed(
        path,
        w0=sd["mlp_extractor.policy_net.0.weight"], b0=sd["mlp_extractor.policy_net.0.bias"],
        w1=sd["mlp_extractor.policy_net.2.weight"], b1=sd["mlp_extractor.policy_net.2.bias"],
        w2=sd["action_net.weight"], b2=sd["action_net.bias"], log_std=sd["log_std"],
        steps=np.int64(steps), train_return=np.float64(np.mean(rets)),
    )
    return path


def train_agent(cfg: AgentConfig) -> list[Path]:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    spec = get_env(cfg.env)
    out_dir = Path(cfg.assets) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(cfg.workdir) / spec.name / "ppo.zip"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    env = gym.make(spec.gym_id)
    if ckpt.exists():
        model = PPO.load(ckpt, env=env, device="cpu")
        print(f"resuming from {ckpt} at {model.num_timesteps} steps", flush=True)
    else:
        model = PPO("MlpPolicy", env, seed=cfg.seed, device="cpu", verbose=0)
    t0 = time.time()

    class Snapshots(BaseCallback):
        def _on_rollout_start(self) -> None:  # called after each policy update, before collecting again
            n, rollout = self.model.num_timesteps, self.model.n_steps * self.model.n_envs
            if n > 0 and n % cfg.snapshot_every < rollout:  # first rollout boundary past each multiple
                p = _save_snapshot(self.model, n, out_dir)
                self.model.save(ckpt)
                ret = float(np.mean([e["r"] for e in self.model.ep_info_buffer]))
                print(json.dumps({"steps": n, "train_return": round(ret, 1), "snapshot": p.name,
                                  "elapsed_s": round(time.time() - t0, 1)}), flush=True)

        def _on_step(self) -> bool:
            return True

    remaining = cfg.total_steps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=Snapshots(), reset_num_timesteps=False)
        _save_snapshot(model, model.num_timesteps, out_dir)
        model.save(ckpt)
    return list_snapshots(cfg.env, cfg.assets)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AgentConfig()
    p.add_argument("--env", default=d.env)
    p.add_argument("--total-steps", type=int, default=d.total_steps)
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", default=d.workdir)
    p.add_argument("--assets", default=d.assets)
    a = p.parse_args(argv)
    snaps = train_agent(AgentConfig(a.env, a.total_steps, a.snapshot_every, a.seed, a.workdir, a.assets))
    print(f"{len(snaps)} snapshots in {snaps[0].parent}")


if __name__ == "__main__":
    main()
