"""The authors' control policy: Gaussian MLP (3x256 ReLU, tanh mean, state-independent log-std in [-5, 2]).

Observations are standardised with dataset statistics kept as buffers (so EMA copies and checkpoints carry them).
`NumpyPolicy` is a copy of the mean-action path in numpy for fast evaluation rollouts.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class GaussianPolicy(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        dims = [obs_dim] + [hidden] * layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU(inplace=True)]  # in place: no extra [N, hidden] buffer
        self.body = nn.Sequential(*body)
        self.mean_head = nn.Linear(hidden, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def set_obs_stats(self, observations: np.ndarray) -> None:
        self.obs_mean.copy_(torch.as_tensor(observations.mean(0)))
        self.obs_std.copy_(torch.as_tensor(observations.std(0) + 1e-3))

    def forward(self, obs: torch.Tensor):
        """Mean action (tanh-squashed) and clamped log-std."""
        h = self.body((obs - self.obs_mean) / self.obs_std)
        return torch.tanh(self.mean_head(h)), self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """log N(act; mean(obs), diag(std^2)) summed over action dimensions -> [N]."""
        mean, log_std = self(obs)
        z = (act - mean) * torch.exp(-log_std)
        return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @torch.no_grad()
    def log_prob_chunked(self, obs: torch.Tensor, act: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        # small chunks keep the [chunk, hidden] activations in cache: ~2x faster than one big matrix on CPU
        return torch.cat([self.log_prob(obs[i:i + chunk], act[i:i + chunk]) for i in range(0, len(obs), chunk)])


class NumpyPolicy:
    """Numpy forward of GaussianPolicy's mean action (no autograd, no torch dispatch overhead)."""

    def __init__(self, policy: GaussianPolicy):
        sd = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in policy.state_dict().items()}
        lin = [m for m in policy.body if isinstance(m, nn.Linear)]
        n = len(lin)
        self.layers = [(sd[f"body.{2 * i}.weight"].T.copy(), sd[f"body.{2 * i}.bias"]) for i in range(n)]
        self.head = (sd["mean_head.weight"].T.copy(), sd["mean_head.bias"])
        self.obs_mean, self.obs_std = sd["obs_mean"], sd["obs_std"]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = (np.asarray(obs, dtype=np.float64) - self.obs_mean) / self.obs_std
        for w, b in self.layers:
            h = np.maximum(h @ w + b, 0.0)
        return np.tanh(h @ self.head[0] + self.head[1])
