"""Evaluation in the data's own environment (Minari spec with kwargs, D4RL -> -v4), shape checks before training,
unmarked episode ends in D4RL files, versions in results."""
import json
import warnings

import h5py
import numpy as np
import pytest

from control.envs import check_shapes, describe_env, eval_id_for_d4rl, make_env
from control.episodes import Episodes, load_d4rl_hdf5, load_minari, save_minari, split_unmarked_ends, write_d4rl_hdf5
from control.train import TrainConfig, train


def rollout(env_id, n_eps=4, seed=0, max_len=60, **kwargs):
    """Random-action episodes recorded in a real env (returns Episodes and final observations)."""
    import gymnasium as gym
    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    obs, act, rew, offs, term, final = [], [], [], [0], [], []
    for k in range(n_eps):
        o, _ = env.reset(seed=k)
        while True:
            a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            o2, r, te, tr, _ = env.step(a)
            obs.append(o), act.append(a), rew.append(r)
            o = o2
            if te or tr or len(rew) - offs[-1] >= max_len:
                break
        offs.append(len(rew)), term.append(bool(te)), final.append(o)
    return Episodes(np.array(obs), np.array(act), np.array(rew), np.array(offs), np.array(term), "hopper"), np.array(final)


def test_minari_dataset_is_evaluated_in_its_own_env_spec(tmp_path, monkeypatch):
    import gymnasium as gym
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    eps, final = rollout("Hopper-v5", terminate_when_unhealthy=False)
    rec = gym.make("Hopper-v5", terminate_when_unhealthy=False)
    save_minari(eps, "test/hopper/kw-v0", final, env=rec)
    data = load_minari("test/hopper/kw-v0")
    assert describe_env(data.eval_env) == {"id": "Hopper-v5", "kwargs": pytest.approx(
        {**gym.spec("Hopper-v5").kwargs, "terminate_when_unhealthy": False}), "max_episode_steps": 1000}
    assert make_env(data.eval_env).unwrapped._terminate_when_unhealthy is False  # the env we evaluate in
    # a separate evaluation spec wins over the recording spec (Minari's recover_environment(eval_env=True))
    save_minari(eps, "test/hopper/kw-eval-v0", final, env=rec,
                eval_env=gym.make("Hopper-v5", healthy_reward=2.0).spec)
    assert describe_env(load_minari("test/hopper/kw-eval-v0").eval_env)["kwargs"]["healthy_reward"] == 2.0
    # and the run records it
    res = train(TrainConfig(algo="bc", steps=2, batch_size=8, eval_every=0, final_eval_episodes=1, hidden=8), data)
    assert res["eval_env"]["kwargs"]["terminate_when_unhealthy"] is False
    assert {"mujoco", "gymnasium", "torch"} <= set(res["versions"])


def test_shapes_are_checked_before_training(tmp_path, monkeypatch):
    import gymnasium as gym
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    # recorded in Hopper-v5 with the x position in the observation (12 dims)
    eps, final = rollout("Hopper-v5", exclude_current_positions_from_observation=False)
    assert eps.observations.shape[1] == 12
    save_minari(eps, "test/hopper/obs12-v0", final,
                env=gym.make("Hopper-v5", exclude_current_positions_from_observation=False))
    data = load_minari("test/hopper/obs12-v0")
    check_shapes(data.eval_env, 12, 3)  # its own env fits
    wrong = load_minari("test/hopper/obs12-v0", eval_env="Hopper-v4")  # evaluated elsewhere: refused up front
    with pytest.raises(ValueError, match=r"observations \[12\].*Hopper-v4.*observation space \(11,\).*--eval-env"):
        train(TrainConfig(algo="bc", steps=10**6, eval_every=0), wrong)
    # data with the wrong action size fails before the first step (not minutes later in evaluation)
    bad = Episodes(eps.observations[:, :11], np.zeros((eps.num_steps, 2)), eps.rewards, eps.offsets, eps.terminated,
                   "hopper", "bad")
    with pytest.raises(ValueError, match=r"bad: observations \[11\] / actions \[2\] do not fit.*Hopper-v5"):
        train(TrainConfig(algo="bc", steps=10**6, eval_every=0), bad)


def test_d4rl_files_are_scored_in_v4_by_default(tmp_path):
    eps, _ = rollout("Hopper-v4", max_len=30)
    path = tmp_path / "hopper_medium_replay-v2.hdf5"
    write_d4rl_hdf5(eps, path)
    data = load_d4rl_hdf5(path)
    assert data.eval_env == "Hopper-v4" and data.summary()["eval_env"]["id"] == "Hopper-v4"
    with pytest.warns(UserWarning, match="recorded in Hopper-v3 in Hopper-v5.*not comparable"):
        assert load_d4rl_hdf5(path, eval_env="Hopper-v5").eval_env == "Hopper-v5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching version: no warning
        assert eval_id_for_d4rl("walker2d", override="Walker2d-v4") == "Walker2d-v4"
    with pytest.raises(ValueError, match="not an environment of 'hopper'"):
        eval_id_for_d4rl("hopper", override="Walker2d-v4")


def test_split_unmarked_ends_by_hand():
    # 2500 steps, only the file end marked: time-limit splits every 1000 steps
    ends, added = split_unmarked_ends(np.array([2500]), 2500, 1000)
    np.testing.assert_array_equal(ends, [1000, 2000, 2500])
    assert added == {"discontinuity": 0, "time_limit": 2}
    # next_observations gap after step 3 (next_obs[3] != obs[4]) in a 7-step file with an end marked at 7
    obs = np.arange(8, dtype=np.float32)[:, None].repeat(2, 1)
    nxt = obs[1:].copy()
    nxt[3] += 5.0
    ends, added = split_unmarked_ends(np.array([7]), 7, 1000, nxt[:7], obs[:7])
    np.testing.assert_array_equal(ends, [4, 7])
    assert added == {"discontinuity": 1, "time_limit": 0}


def test_glued_d4rl_episodes_are_split(tmp_path):
    """Two 1000-step time-limited Hopper episodes whose first timeout is missing load as two episodes, not one
    2000-step episode with the summed return; and a gap in next_observations splits too."""
    rng = np.random.default_rng(0)
    n = 2000 + 37 + 50
    obs = rng.normal(size=(n, 11)).astype(np.float32)
    nxt = np.concatenate([obs[1:], rng.normal(size=(1, 11))]).astype(np.float32)
    nxt[2000 + 36] += 1.0  # the 37-step episode after them ends without a mark: next_obs does not continue
    path = tmp_path / "hopper_glued-v1.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["next_observations"], f["actions"] = obs, nxt, np.zeros((n, 3), np.float32)
        f["rewards"] = np.ones(n, np.float32)
        f["terminals"] = np.zeros(n, bool)
        timeouts = np.zeros(n, bool)
        timeouts[[1999, n - 1]] = True  # the end of the first episode (step 999) is not marked
        f["timeouts"] = timeouts
    with pytest.warns(UserWarning, match="2 episode end"):
        data = load_d4rl_hdf5(path)
    np.testing.assert_array_equal(data.lengths, [1000, 1000, 37, 50])
    np.testing.assert_allclose(data.returns, [1000, 1000, 37, 50])
    assert data.summary()["split_episodes"] == {"discontinuity": 1, "time_limit": 1}
    assert not data.terminated.any()  # split ends are time limits, not terminal states
    json.dumps(data.summary())  # reported in dataset.json
