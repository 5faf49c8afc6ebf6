"""Exponential moving average of a policy, used as the lagged weighting policy ``q``.

The authors' control code weights with ``q`` = an EMA of the trained policy (decay 0.9, updated every step):
``q`` tracks ``p_θ`` (where the bound is tight) while lagging enough to keep the weights stable.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``p_ema ← decay · p_ema + (1 − decay) · p`` after each optimiser step; buffers are copied.

    ``.module`` is a frozen deep copy of the tracked module (eval mode, no grad).
    """

    def __init__(self, module: nn.Module, decay: float = 0.9):
        if not 0 <= decay <= 1:
            raise ValueError(f"ema decay={decay} must be in [0, 1] (0 = copy the policy every step).")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = list(module.parameters())
        if len(ema_params) != len(params):
            raise ValueError("EMA.update got a module with a different structure from the one it copies.")
        if ema_params:
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)
