"""Offline continuous control with BC, filtered BC, SFT(Q), iw-SFT and iw-SFT(Q) (the paper's control setting).

Modules, in the order data flows through them:
  envs        environment names, gymnasium ids, D4RL reference scores, normalised score
  episodes    the episode representation (flat arrays + offsets) and loaders (Minari, D4RL HDF5)
  agent       the stable-baselines3 behaviour agent and its small policy snapshots (control/assets/)
  data        builds medium / medium-replay / medium-expert Minari datasets offline
  policy      the authors' Gaussian MLP policy and its numpy forward
  evaluate    fast lockstep evaluation rollouts and normalised scores
  train       the trainer: one loop, weighting chosen by config
  experiments algorithms x seeds x datasets, tables and plots
"""
