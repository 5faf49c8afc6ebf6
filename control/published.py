"""Published D4RL scores, printed next to ours as context, never as a baseline of ours.

Source: CORL (Tarasov et al., "CORL: Research-oriented Deep Offline Reinforcement Learning Library", NeurIPS 2023
Datasets and Benchmarks), README "D4RL Benchmarks / Offline / Last Scores / Gym-MuJoCo", repository tinkoff-ai/CORL
at commit 022e449b559c8d9fb0847dc987582068d25b258e: mean ± std over seeds of the D4RL-normalised score of the policy
after the last training step. Their data are the D4RL `-v2` files (SAC behaviour policies on `-v3` environments under
mujoco-py); ours are rebuilt from PPO snapshots on gymnasium's `-v5` environments, so only the ordering of methods is
comparable, not the numbers.
"""
from __future__ import annotations

import re

SOURCE = "CORL last scores on D4RL -v2 (tinkoff-ai/CORL README @022e449b)"
ALGOS = ("BC", "10%BC", "TD3+BC", "IQL")

# (env, dataset kind) -> {algorithm: (mean, std)}
CORL_LAST = {
    ("halfcheetah", "medium"): {"BC": (42.40, 0.19), "10%BC": (42.46, 0.70), "TD3+BC": (48.10, 0.18), "IQL": (48.31, 0.22)},
    ("halfcheetah", "medium-replay"): {"BC": (35.66, 2.33), "10%BC": (23.59, 6.95), "TD3+BC": (44.84, 0.59), "IQL": (44.46, 0.22)},
    ("halfcheetah", "medium-expert"): {"BC": (55.95, 7.35), "10%BC": (90.10, 2.45), "TD3+BC": (90.78, 6.04), "IQL": (94.74, 0.52)},
    ("hopper", "medium"): {"BC": (53.51, 1.76), "10%BC": (55.48, 7.30), "TD3+BC": (60.37, 3.49), "IQL": (67.53, 3.78)},
    ("hopper", "medium-replay"): {"BC": (29.81, 2.07), "10%BC": (70.42, 8.66), "TD3+BC": (64.42, 21.52), "IQL": (97.43, 6.39)},
    ("hopper", "medium-expert"): {"BC": (52.30, 4.01), "10%BC": (111.16, 1.03), "TD3+BC": (101.17, 9.07), "IQL": (107.42, 7.80)},
    ("walker2d", "medium"): {"BC": (63.23, 16.24), "10%BC": (67.34, 5.17), "TD3+BC": (82.71, 4.78), "IQL": (80.91, 3.17)},
    ("walker2d", "medium-replay"): {"BC": (21.80, 10.15), "10%BC": (54.35, 6.34), "TD3+BC": (85.62, 4.01), "IQL": (82.15, 3.03)},
    ("walker2d", "medium-expert"): {"BC": (98.96, 15.98), "10%BC": (108.70, 0.25), "TD3+BC": (110.03, 0.36), "IQL": (111.72, 0.86)},
}

# longest first: "medium-replay" and "medium-expert" must not be read as "medium"
_KINDS = ("medium-replay", "medium-expert", "medium", "expert")


def dataset_kind(name: str) -> str | None:
    """The D4RL dataset kind a dataset name or Minari id refers to ("iwsft/hopper/medium-replay-v0",
    "iwsft/hopper/medium-replay-50k-v0", "hopper_medium_replay-v2" -> "medium-replay"), or None. A smaller or
    re-seeded build of a kind keeps its kind: the context line says it is a different data source anyway."""
    text = name.lower().replace("_", "-")
    for kind in _KINDS:
        if re.search(rf"(^|[/:\-]){kind}($|[/\-])", text):
            return kind
    return None


def corl_context(env: str | None, source: str) -> str | None:
    """One line with CORL's published last scores for this environment and dataset kind, or None if it has none."""
    scores = CORL_LAST.get((env or "", dataset_kind(source) or ""))
    if not scores:
        return None
    parts = ", ".join(f"{a} {m:.1f} ± {s:.1f}" for a, (m, s) in scores.items())
    return f"Context, a different data source ({SOURCE}, {env}-{dataset_kind(source)}-v2): {parts}."
