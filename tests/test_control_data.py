"""Episode representation, Minari round trip, D4RL HDF5 files, normalised scores and bad inputs."""
import h5py
import numpy as np
import pytest

from control.envs import get_env, normalized_score
from control.episodes import Episodes, load_d4rl_hdf5, load_minari, save_minari, write_d4rl_hdf5
from control.train import TrainConfig, Trainer


def hopper_like(seed=0, n=6):
    """Tiny Hopper-shaped episodes (11-dim observations, 3-dim actions), not from the simulator."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, size=n)
    N = int(lengths.sum())
    return Episodes(rng.normal(size=(N, 11)), rng.uniform(-1, 1, size=(N, 3)), rng.normal(size=N),
                    np.concatenate([[0], np.cumsum(lengths)]), np.arange(n) % 2 == 0, env="hopper", source="test")


def test_episode_arrays_and_returns():
    e = hopper_like()
    assert e.num_episodes == 6 and e.num_steps == e.lengths.sum()
    manual = [e.rewards[e.offsets[i]:e.offsets[i + 1]].astype(np.float64).sum() for i in range(6)]
    np.testing.assert_allclose(e.returns, manual, rtol=1e-6)
    sub = e.select([4, 1])
    np.testing.assert_array_equal(sub.observations, np.concatenate([e.observations[e.offsets[4]:e.offsets[5]],
                                                                    e.observations[e.offsets[1]:e.offsets[2]]]))
    np.testing.assert_array_equal(sub.terminated, e.terminated[[4, 1]])


def test_minari_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    e = hopper_like(1)
    final = np.random.default_rng(0).normal(size=(e.num_episodes, 11))
    ds = save_minari(e, "iwsft-test/hopper/tiny-v0", final, description="test")
    assert ds.total_episodes == e.num_episodes and ds.total_steps == e.num_steps
    assert ds.storage.metadata["ref_min_score"] == pytest.approx(-20.272305)
    assert ds.storage.metadata["ref_max_score"] == pytest.approx(3234.3)
    for loaded in (load_minari("iwsft-test/hopper/tiny-v0"),  # by id
                   load_minari(tmp_path / "minari" / "iwsft-test" / "hopper" / "tiny-v0")):  # by directory
        assert loaded.env == "hopper"
        np.testing.assert_array_equal(loaded.offsets, e.offsets)
        np.testing.assert_allclose(loaded.observations, e.observations, rtol=1e-6)
        np.testing.assert_allclose(loaded.actions, e.actions, rtol=1e-6)
        np.testing.assert_allclose(loaded.rewards, e.rewards, rtol=1e-6)
        np.testing.assert_array_equal(loaded.terminated, e.terminated)
    # Minari's own normalisation agrees with ours (it uses [0, 1], we use [0, 100])
    import minari
    np.testing.assert_allclose(100 * minari.get_normalized_score(ds, np.array([0.0, 1000.0])),
                               normalized_score("hopper", np.array([0.0, 1000.0])), rtol=1e-6)


def test_d4rl_hdf5_written_and_loaded(tmp_path):
    e = hopper_like(2)
    path = tmp_path / "hopper_tiny-v2.hdf5"
    write_d4rl_hdf5(e, path)
    with h5py.File(path, "r") as f:  # the D4RL layout, checked by hand
        assert set(f.keys()) == {"observations", "actions", "rewards", "terminals", "timeouts"}
        ends = np.flatnonzero(f["terminals"][()] | f["timeouts"][()]) + 1
    np.testing.assert_array_equal(ends, e.offsets[1:])
    loaded = load_d4rl_hdf5(path)
    assert loaded.env == "hopper"
    np.testing.assert_array_equal(loaded.offsets, e.offsets)
    np.testing.assert_array_equal(loaded.terminated, e.terminated)
    np.testing.assert_allclose(loaded.returns, e.returns, rtol=1e-6)


def test_d4rl_trailing_partial_episode_and_env_from_name(tmp_path):
    path = tmp_path / "walker2d_x.hdf5"
    with h5py.File(path, "w") as f:  # 7 steps: an episode ending by timeout at step 3, then 4 unfinished steps
        f["observations"], f["actions"] = np.zeros((7, 17)), np.zeros((7, 6))
        f["rewards"] = np.arange(7.0)
        f["terminals"] = np.zeros(7, bool)
        f["timeouts"] = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    e = load_d4rl_hdf5(path)
    assert e.env == "walker2d"
    np.testing.assert_array_equal(e.offsets, [0, 3, 7])
    np.testing.assert_allclose(e.returns, [3.0, 18.0])


def test_normalized_score_arithmetic():
    assert normalized_score("hopper", -20.272305) == pytest.approx(0.0, abs=1e-9)
    assert normalized_score("hopper", 3234.3) == pytest.approx(100.0)
    assert normalized_score("hopper", (3234.3 - 20.272305) / 2) == pytest.approx(50.0)
    assert normalized_score("halfcheetah", 12135.0) == pytest.approx(100.0)
    assert normalized_score("walker2d", 1.629008 + 0.25 * (4592.3 - 1.629008)) == pytest.approx(25.0)
    np.testing.assert_allclose(normalized_score("Hopper-v5", np.array([-20.272305, 1607.0139475])), [0.0, 50.0])


# ---- bad inputs
def test_unknown_env_id():
    with pytest.raises(ValueError, match="unknown environment 'pong'.*hopper"):
        get_env("pong")


def test_d4rl_without_timeouts(tmp_path):
    path = tmp_path / "hopper_old-v0.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"] = np.zeros((4, 11)), np.zeros((4, 3))
        f["rewards"], f["terminals"] = np.zeros(4), np.zeros(4, bool)
    with pytest.raises(ValueError, match="no 'timeouts' field.*-v2"):
        load_d4rl_hdf5(path)


def test_d4rl_fields_of_different_lengths(tmp_path):
    path = tmp_path / "hopper_bad-v2.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"] = np.zeros((4, 11)), np.zeros((4, 3))
        f["rewards"], f["terminals"], f["timeouts"] = np.zeros(4), np.zeros(3, bool), np.zeros(4, bool)
    with pytest.raises(ValueError, match="field 'terminals' has 3 entries but 'rewards' has 4"):
        load_d4rl_hdf5(path)


def test_nan_in_observations(tmp_path):
    e = hopper_like(3)
    obs = e.observations.copy()
    obs[e.offsets[2] + 1, 4] = np.nan
    with pytest.raises(ValueError, match=r"field 'observations' has NaN.*episode 2, step 1.*drop_nonfinite"):
        Episodes(obs, e.actions, e.rewards, e.offsets, e.terminated, "hopper")
    # the suggested fix works: the loader drops the bad episode
    path = tmp_path / "hopper_nan.hdf5"
    write_d4rl_hdf5(e, path)
    with h5py.File(path, "r+") as f:
        f["observations"][e.offsets[2] + 1, 4] = np.nan
    with pytest.raises(ValueError, match="'observations' has NaN"):
        load_d4rl_hdf5(path)
    with pytest.warns(UserWarning, match="dropped 1 of 6 episodes"):
        kept = load_d4rl_hdf5(path, drop_nonfinite=True)
    assert kept.num_episodes == e.num_episodes - 1


def test_empty_filter_result():
    e = hopper_like(4)
    with pytest.raises(ValueError, match="selects none"):
        Trainer(TrainConfig(algo="filtered_bc", filter_fraction=0.05), e)
    with pytest.raises(ValueError, match="selection is empty"):
        e.select(np.zeros(e.num_episodes, bool))


def test_unknown_minari_id(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="minari download mujoco/hopper/nope-v0"):
        load_minari("mujoco/hopper/nope-v0")


def test_unknown_algo():
    with pytest.raises(ValueError, match="unknown algo 'ppo'"):
        TrainConfig(algo="ppo")


def test_snapshot_numpy_policy_matches_sb3(tmp_path):
    """The numpy snapshot used to build datasets acts like the SB3 PPO policy it was saved from."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    from control.agent import SnapshotPolicy, _save_snapshot
    model = PPO("MlpPolicy", gym.make("Hopper-v5"), seed=0, device="cpu")
    snap = SnapshotPolicy(_save_snapshot(model, 123, tmp_path))
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    expected, _ = model.predict(obs, deterministic=True)  # mean action, clipped to the action space
    np.testing.assert_allclose(snap.act(obs, None), expected, rtol=1e-5, atol=1e-5)
    assert snap.steps == 123


def test_snapshot_with_obs_normalisation_matches_sb3(tmp_path):
    """rl-zoo3-style agent (ReLU 256x256, VecNormalize): the snapshot applies the saved normaliser and acts like SB3
    does on normalised observations (fp16 weights: close, not equal)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from control.agent import SnapshotPolicy, _save_snapshot
    env = VecNormalize(DummyVecEnv([lambda: gym.make("HalfCheetah-v5")]))
    model = PPO("MlpPolicy", env, seed=0, device="cpu", policy_kwargs=dict(
        activation_fn=torch.nn.ReLU, net_arch=dict(pi=[256, 256], vf=[256, 256]), log_std_init=-2))
    rng = np.random.default_rng(0)
    env.obs_rms.mean, env.obs_rms.var = rng.normal(size=17), rng.uniform(0.5, 4.0, size=17)  # a non-trivial normaliser
    obs = rng.normal(scale=3.0, size=(5, 17)).astype(np.float32)
    expected, _ = model.predict(env.normalize_obs(obs), deterministic=True)
    for half, tol in ((False, 1e-5), (True, 5e-3)):
        snap = SnapshotPolicy(_save_snapshot(model, 7, tmp_path, vecnorm=env, half=half))
        np.testing.assert_allclose(snap.act(obs, None), expected, rtol=tol, atol=tol)
        np.testing.assert_allclose(snap.std, np.exp(-2.0), rtol=1e-6)


def test_shipped_snapshots_exist_and_are_small():
    from control.agent import ASSETS, list_snapshots
    snaps = list_snapshots("hopper")
    assert len(snaps) >= 10
    assert sum(p.stat().st_size for p in snaps) < 2_000_000
    assert all(p.parent == ASSETS / "hopper" for p in snaps)


def _continuous_file(path, n_ep=4, T=50, env="hopper"):
    """D4RL file of n_ep marked episodes of T steps whose next_observations continue exactly within each episode."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n_ep * T, 11)).astype(np.float32)
    nxt = np.roll(obs, -1, axis=0)  # next_obs[t] == obs[t+1]: no gap inside the file
    tout = np.zeros(n_ep * T, bool)
    tout[T - 1::T] = True
    with h5py.File(path, "w") as f:
        f["observations"], f["next_observations"] = obs, nxt
        f["actions"], f["rewards"] = np.zeros((n_ep * T, 3), np.float32), np.ones(n_ep * T, np.float32)
        f["terminals"], f["timeouts"] = np.zeros(n_ep * T, bool), tout
        f.attrs["env_name"] = env
    return obs, nxt


def test_nan_observation_is_located_in_its_real_episode(tmp_path):
    """A NaN at file row 123 (episode 2, step 23 of 50-step episodes) must neither split episode 2 (NaN never compares
    equal to next_observations) nor be reported as episode 3; --drop-nonfinite drops all of episode 2."""
    path = tmp_path / "hopper_nan.hdf5"
    obs, nxt = _continuous_file(path)
    with h5py.File(path, "r+") as f:
        f["observations"][123, 5] = np.nan
        f["next_observations"][122, 5] = np.nan  # the same value seen as the previous step's next observation
    with pytest.raises(ValueError, match=r"field 'observations' has NaN/inf values at 1 steps \(first: episode 2, "
                                         r"step 23\)"):
        load_d4rl_hdf5(path)
    with pytest.warns(UserWarning, match=r"dropped 1 of 4 episodes \(50 steps\)"):
        kept = load_d4rl_hdf5(path, drop_nonfinite=True)
    np.testing.assert_array_equal(kept.offsets, [0, 50, 100, 150])  # episodes 0, 1, 3 whole
    np.testing.assert_array_equal(kept.observations[100:150], obs[150:200])
    assert kept.splits == {"discontinuity": 0, "time_limit": 0}


def test_env_contradicting_the_dataset_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "data.hdf5"
    _continuous_file(path, env="walker2d")  # shapes do not matter here: the refusal comes first
    with pytest.raises(ValueError, match=r"--env 'hopper' contradicts the dataset's own environment 'walker2d'.*"
                                         r"drop --env"):
        load_d4rl_hdf5(path, env="hopper")
    assert load_d4rl_hdf5(path, env="walker2d").env == "walker2d"  # agreeing is fine
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    e = hopper_like(1)
    save_minari(e, "iwsft-test/hopper/env-v0", np.zeros((e.num_episodes, 11)))
    with pytest.raises(ValueError, match=r"--env 'walker2d' contradicts the dataset's own environment 'Hopper-v5'"):
        load_minari("iwsft-test/hopper/env-v0", env="walker2d")


def test_eval_env_override_on_minari_keeps_or_names_what_it_drops(tmp_path, monkeypatch):
    import json

    import gymnasium as gym
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    e = hopper_like(2)
    env = gym.make("Hopper-v5", healthy_reward=2.5, max_episode_steps=300)
    save_minari(e, "iwsft-test/hopper/kw-v0", np.zeros((e.num_episodes, 11)), env=env)
    env.close()
    own = json.loads(load_minari("iwsft-test/hopper/kw-v0").eval_env)
    assert own["kwargs"]["healthy_reward"] == 2.5 and own["max_episode_steps"] == 300
    # the same id: the dataset's kwargs and step limit are kept, silently
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = load_minari("iwsft-test/hopper/kw-v0", eval_env="Hopper-v5")
    assert json.loads(same.eval_env)["kwargs"]["healthy_reward"] == 2.5 and "eval_warning" not in same.summary()
    # another version: warned, naming the dropped kwarg, the step limit and the version; kept in the summary
    with pytest.warns(UserWarning) as w:
        other = load_minari("iwsft-test/hopper/kw-v0", eval_env="Hopper-v4")
    msg = " ".join(str(x.message) for x in w)
    assert "v4 vs v5" in msg and "'healthy_reward': 2.5" in msg and "step limit 1000 instead of the dataset's 300" in msg
    assert other.eval_env == "Hopper-v4" and "healthy_reward" in other.summary()["eval_warning"]
    with pytest.raises(ValueError, match="not an environment of 'hopper'"):
        load_minari("iwsft-test/hopper/kw-v0", eval_env="Walker2d-v4")


# ---- dataset ids, the build CLI and its refusals (issue: new-user review of control.data)
def test_dataset_ids_name_the_exact_size():
    from control.data import dataset_id
    assert dataset_id("hopper", "medium", 5400) == "iwsft/hopper/medium-5400-v0"
    assert dataset_id("hopper", "medium", 5000) == "iwsft/hopper/medium-5k-v0"  # multiples of 1000 keep their ids
    assert dataset_id("hopper", "medium-replay", 3000) == "iwsft/hopper/medium-replay-3k-v0"
    assert dataset_id("hopper", "medium-replay", 200_000) == "iwsft/hopper/medium-replay-v0"  # the default size
    assert dataset_id("Walker2d-v5", "expert", 200_001, seed=2) == "iwsft/walker2d/expert-200001-seed2-v0"
    assert dataset_id("hopper", "medium", 999) == "iwsft/hopper/medium-999-v0"  # was "-0k"


def test_build_refuses_sizes_below_one_and_negative_seeds(tmp_path, monkeypatch):
    from control.data import build, build_episodes
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    for steps in (0, -5):
        with pytest.raises(ValueError, match=rf"dataset size steps={steps}: a dataset needs at least 1 environment "
                                             r"step \(CLI: --steps / --dataset-steps"):
            build_episodes("hopper", "medium", steps)
        with pytest.raises(ValueError, match=rf"steps={steps}"):
            build("hopper", "medium", steps)
    with pytest.raises(ValueError, match=r"dataset seed=-1: the rollout seed must be an integer >= 0"):
        build("hopper", "medium", 1000, seed=-1)
    assert not (tmp_path / "minari").exists()  # refused before anything was written


@pytest.mark.parametrize("args, expected", [
    (["--env", "ant"], "error: --env 'ant': unknown environment 'ant': expected one of ['halfcheetah', 'hopper', "
                       "'walker2d']"),
    (["--assets", "{empty}"], "error: --assets {empty}: no behaviour-policy snapshots (snap_*.npz) in {empty}/hopper."),
    (["--kind", "medium", "--steps", "0"], "error: --steps 0: a dataset needs at least 1 environment step"),
    (["--kind", "medium", "--steps", "-5"], "error: --steps -5: a dataset needs at least 1 environment step"),
    (["--seed", "-1"], "error: --seed -1: the rollout seed must be >= 0"),
])
def test_data_cli_user_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, expected):
    from control import data
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.delenv("IWSFT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        data.main(["build"] + [a.replace("{empty}", str(empty)) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected.replace("{empty}", str(empty))), err
    assert err.count("\n") == 1 and err.rstrip().endswith("(set IWSFT_TRACEBACK=1 for the traceback)")
    assert not (tmp_path / "minari").exists()
    monkeypatch.setenv("IWSFT_TRACEBACK", "1")  # the traceback on request
    with pytest.raises((ValueError, FileNotFoundError)):
        data.main(["build"] + [a.replace("{empty}", str(empty)) for a in args])


def test_data_cli_help_and_empty_list(tmp_path, monkeypatch, capsys):
    import argparse

    from control import data
    build_parser = next(a for a in data.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    b = build_parser.choices["build"]
    for action in b._actions:
        assert action.help, f"{action.option_strings} has no help line"
    text = " ".join(b.format_help().split())
    assert "--env ENV environment to roll out in" in text and "(default: hopper)" in text
    assert "--seed SEED rollout seed (>= 0)" in text and "(default: 0)" in text
    assert "--allow-unfinished-agent" in text
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    data.main(["list"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith(f"no Minari datasets in {tmp_path / 'store'} ") and "control.data build" in out


def _snap(folder, steps, obs_dim=17, act_dim=6):
    """A snapshot written by hand: one linear layer of zeros (mean action 0), std e^-1."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"snap_{steps:08d}.npz", w0=np.zeros((act_dim, obs_dim), np.float32),
             b0=np.zeros(act_dim, np.float32), log_std=np.full(act_dim, -1.0, np.float32), steps=np.int64(steps),
             train_return=np.float64(0.0))


def test_snapshots_of_an_unfinished_agent_are_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    import json

    import minari

    from control import data
    from control.agent import check_agent_finished
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assets = tmp_path / "assets"
    _snap(assets / "walker2d", 51200)
    _snap(assets / "walker2d", 102400)  # stopped at 102,400 of walker2d's 1M steps, no agent.json
    expected = (rf"{assets}/walker2d: the behaviour agent's training is unfinished: its last snapshot "
                r"\(snap_00102400.npz\) is at 102,400 of 1,228,800 steps \(no agent.json recording a finished run\)"
                rf".*`python -m control.agent --env walker2d --assets {assets}` \(resumable\), or pass "
                r"--allow-unfinished-agent")
    with pytest.raises(ValueError, match=expected):
        data.build_episodes("walker2d", "expert", 10, assets=assets)
    with pytest.raises(SystemExit) as e:
        data.main(["build", "--env", "walker2d", "--kind", "expert", "--steps", "10", "--assets", str(assets)])
    assert e.value.code == 2 and "102,400 of 1,228,800 steps" in capsys.readouterr().err
    assert minari.list_local_datasets() == {}  # refused before anything was rolled out or written
    # a record saying unfinished (an interrupted run): the steps it asked for
    (assets / "walker2d" / "agent.json").write_text(json.dumps({"finished": False, "total_steps": 300000}))
    with pytest.raises(ValueError, match=r"at 102,400 of 300,000 steps \(agent.json says unfinished\)"):
        check_agent_finished("walker2d", assets)
    # a finished record whose final snapshot is not the last one here: snapshots changed after it finished
    (assets / "walker2d" / "agent.json").write_text(json.dumps({"finished": True,
                                                                "final_snapshot": "snap_00051200.npz"}))
    with pytest.raises(ValueError, match=r"records a finished run ending at 'snap_00051200.npz', but the last "
                                         r"snapshot here is snap_00102400.npz \(102,400 steps\)"):
        check_agent_finished("walker2d", assets)
    # the explicit opt-in builds, and the dataset says where it came from
    data.main(["build", "--env", "walker2d", "--kind", "expert", "--steps", "10", "--assets", str(assets),
               "--allow-unfinished-agent"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "iwsft/walker2d/expert-10-v0"
    desc = minari.load_dataset("iwsft/walker2d/expert-10-v0").storage.metadata["description"]
    assert "UNFINISHED agent (last snapshot at 102400 steps)" in desc


def test_shipped_hopper_agent_is_recorded_as_finished():
    """control/assets/hopper/agent.json agrees with the README (SB3 PPO defaults, 300k steps, seed 0, a snapshot
    every 10,240 steps) and with the snapshot files themselves."""
    from control.agent import ASSETS, check_agent_finished, list_snapshots
    rec = check_agent_finished("hopper")
    assert (rec["env"], rec["total_steps"], rec["seed"], rec["snapshot_every"]) == ("hopper", 300000, 0, 10240)
    assert rec["hyperparams_source"].startswith("SB3 PPO defaults") and rec["finished"] is True
    names = [p.name for p in list_snapshots("hopper")]
    # 29 snapshots at multiples of 10,240, then the last rollout boundary past 300,000 (147 rollouts of 2,048 steps)
    assert names == [f"snap_{10240 * k:08d}.npz" for k in range(1, 30)] + ["snap_00301056.npz"]
    assert rec["final_snapshot"] == "snap_00301056.npz" and rec["steps_done"] == 147 * 2048 == 301056
    assert rec["snapshots"] == len(names) == 30
    for p in list_snapshots("hopper"):
        with np.load(p) as z:
            assert f"snap_{int(z['steps']):08d}.npz" == p.name  # the steps stored inside match the name
    assert (ASSETS / "hopper" / "agent.json").exists()


def test_train_agent_records_unfinished_then_finished(tmp_path, monkeypatch):
    """A tiny PPO run (64-step rollouts, 128 steps) interrupted at its last snapshot leaves "finished": false; the
    resumed run finishes and records it."""
    import json

    import control.agent as agent
    monkeypatch.setitem(agent.HYPERPARAMS, "hopper", dict(
        total_steps=128, snapshot_every=64, normalize=False, half=False, source="test settings",
        ppo=dict(n_steps=64, batch_size=32, n_epochs=1)))
    cfg = agent.AgentConfig(env="hopper", workdir=str(tmp_path / "work"), assets=str(tmp_path / "assets"))
    real = agent._save_snapshot

    def stop_at_128(model, steps, *a, **k):
        if steps == 128:
            raise KeyboardInterrupt  # as if the user stopped the run before its final snapshot
        return real(model, steps, *a, **k)

    monkeypatch.setattr(agent, "_save_snapshot", stop_at_128)
    with pytest.raises(KeyboardInterrupt):
        agent.train_agent(cfg)
    rec = json.loads((tmp_path / "assets" / "hopper" / "agent.json").read_text())
    assert rec["finished"] is False and rec["total_steps"] == 128
    with pytest.raises(ValueError, match=r"\(snap_00000064.npz\) is at 64 of 128 steps \(agent.json says unfinished\)"):
        agent.check_agent_finished("hopper", tmp_path / "assets")
    monkeypatch.setattr(agent, "_save_snapshot", real)
    snaps = agent.train_agent(cfg)  # resumes from the 64-step checkpoint
    assert [p.name for p in snaps] == ["snap_00000064.npz", "snap_00000128.npz"]
    rec = agent.check_agent_finished("hopper", tmp_path / "assets")
    assert rec["finished"] is True and rec["steps_done"] == 128 and rec["final_snapshot"] == "snap_00000128.npz"
    assert (rec["env"], rec["seed"], rec["hyperparams_source"], rec["snapshots"]) == ("hopper", 0, "test settings", 2)
    assert rec["versions"]["stable-baselines3"]


# ---- D4RL loader: bad files, dropped episodes, actions outside the action space
def test_d4rl_file_with_zero_steps(tmp_path):
    path = tmp_path / "hopper_empty-v2.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"] = np.zeros((0, 11)), np.zeros((0, 3))
        f["rewards"], f["terminals"], f["timeouts"] = np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)
    with pytest.raises(ValueError, match=r"hopper_empty-v2.hdf5: the file holds 0 steps"):
        load_d4rl_hdf5(path)


def test_d4rl_path_that_is_not_hdf5(tmp_path):
    path = tmp_path / "hopper_medium-v2.hdf5"
    path.write_text("<html>404 Not Found</html>")  # e.g. a failed download saved under the file's name
    with pytest.raises(ValueError, match=r"hopper_medium-v2.hdf5: not an HDF5 file \(no HDF5 signature; 26 bytes"):
        load_d4rl_hdf5(path)
    with pytest.raises(FileNotFoundError, match="nope.hdf5 does not exist"):
        load_d4rl_hdf5(tmp_path / "nope.hdf5")


def test_d4rl_file_without_any_dataset_lists_every_missing_field(tmp_path):
    path = tmp_path / "hopper_x.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["env_name"] = "hopper"
    with pytest.raises(ValueError) as e:
        load_d4rl_hdf5(path)
    msg = str(e.value)
    assert "missing D4RL field(s) ['observations', 'actions', 'rewards', 'terminals', 'timeouts']" in msg
    assert "this one has []" in msg


def test_drop_nonfinite_says_how_many_episodes_it_dropped(tmp_path):
    path = tmp_path / "hopper_nan.hdf5"
    _continuous_file(path)  # 4 episodes of 50 steps
    with h5py.File(path, "r+") as f:
        f["rewards"][60] = np.inf  # episode 1
        f["actions"][170, 0] = np.nan  # episode 3
    with pytest.warns(UserWarning, match=r"--drop-nonfinite dropped 2 of 4 episodes \(100 steps\) with NaN/inf "
                                         r"values; 2 episodes remain"):
        kept = load_d4rl_hdf5(path, drop_nonfinite=True)
    assert kept.num_episodes == 2
    with h5py.File(path, "r+") as f:
        f["observations"][[10, 120], 0] = np.nan  # episodes 0 and 2 too: nothing is left
    with pytest.raises(ValueError, match=r"all 4 episodes had NaN/inf values"):
        load_d4rl_hdf5(path, drop_nonfinite=True)


def test_actions_outside_the_action_space_are_warned_about(tmp_path, monkeypatch):
    import warnings
    path = tmp_path / "hopper_act.hdf5"
    _continuous_file(path, n_ep=2, T=4)  # 8 steps, actions all 0
    with h5py.File(path, "r+") as f:
        f["actions"][1] = [1.5, 0.0, 0.0]
        f["actions"][2] = [0.0, -2.0, 0.3]
        f["actions"][6] = [1.2, 1.1, 0.0]
        f["actions"][7] = [1.0, -1.0, 0.0]  # the edges themselves are inside
    with pytest.warns(UserWarning, match=r"3 of 8 steps have actions outside the action space \[-1, 1\] "
                                         r"\(range seen: \[-2, 1.5\]\).*tanh mean cannot reach them"):
        load_d4rl_hdf5(path)
    with h5py.File(path, "r+") as f:
        f["actions"][:] = np.clip(f["actions"][()], -1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in range: silent
        load_d4rl_hdf5(path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))  # the Minari loader checks too
    e = hopper_like(5)
    act = e.actions.copy()
    act[0, 2] = -3.0
    save_minari(Episodes(e.observations, act, e.rewards, e.offsets, e.terminated, "hopper"), "iwsft-test/hopper/a-v0",
                np.zeros((e.num_episodes, 11)))
    with pytest.warns(UserWarning, match=rf"1 of {e.num_steps} steps have actions outside"):
        load_minari("iwsft-test/hopper/a-v0")


def test_a_refused_forced_rebuild_keeps_the_old_dataset(tmp_path, monkeypatch):
    import minari

    import control.data as data
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    did = data.build("hopper", "expert", 1000)

    def refuse(*a, **k):
        raise ValueError("snapshots of an unfinished agent")

    monkeypatch.setattr(data, "build_episodes", refuse)
    with pytest.raises(ValueError, match="unfinished"):
        data.build("hopper", "expert", 1000, force=True)
    assert did in minari.list_local_datasets()  # deleted only once a new one is built


@pytest.mark.parametrize("env", ["hopper", "walker2d", "halfcheetah"])
def test_shipped_behaviour_agents_are_finished_and_act_in_their_environment(env):
    """Every shipped agent has a finished run record naming its last snapshot (control.data builds only from those),
    and that snapshot maps the simulator's observations to actions of the simulator's shape, inside [-1, 1]."""
    import gymnasium as gym

    from control.agent import SnapshotPolicy, check_agent_finished, list_snapshots
    from control.envs import get_env
    rec = check_agent_finished(env)
    snaps = list_snapshots(env)
    assert rec["finished"] is True and rec["final_snapshot"] == snaps[-1].name
    assert rec["steps_done"] == int(np.load(snaps[-1])["steps"])
    e = gym.make(get_env(env).gym_id)
    obs, _ = e.reset(seed=0)
    a = SnapshotPolicy(snaps[-1]).act(obs[None], np.random.default_rng(0))[0]
    assert a.shape == e.action_space.shape and np.all(np.abs(a) <= 1.0)
    e.close()


def test_an_existing_dataset_is_reused_only_for_the_snapshots_that_built_it(tmp_path, monkeypatch, capsys):
    """A dataset id names env, kind, size and seed, not the snapshots: reusing it for other snapshots, or reusing
    one built from an unfinished agent for a finished one, is refused with --force as the fix."""
    import json

    from control import data
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    a, b = tmp_path / "a", tmp_path / "b"
    for assets in (a, b):
        _snap(assets / "walker2d", 51200)
        (assets / "walker2d" / "agent.json").write_text(json.dumps({"finished": True,
                                                                    "final_snapshot": "snap_00051200.npz"}))
    # b's snapshot differs in one byte-level value (its log-std)
    z = dict(np.load(b / "walker2d" / "snap_00051200.npz"))
    np.savez(b / "walker2d" / "snap_00051200.npz", **{**z, "log_std": z["log_std"] + 0.5})
    assert data.build("walker2d", "medium", 10, assets=a) == "iwsft/walker2d/medium-10-v0"
    assert data.build("walker2d", "medium", 10, assets=a) == "iwsft/walker2d/medium-10-v0"  # same snapshots: reused
    with pytest.raises(ValueError, match=r"exists but was built from other snapshots .*--force"):
        data.build("walker2d", "medium", 10, assets=b)
    assert data.build("walker2d", "medium", 10, assets=b, force=True) == "iwsft/walker2d/medium-10-v0"
    # a dataset from an unfinished agent is not reused for a finished one
    _snap(a / "walker2d", 102400)  # a later snapshot, not in a's finished record
    data.build("walker2d", "expert", 10, assets=a, allow_unfinished_agent=True)
    (a / "walker2d" / "snap_00102400.npz").unlink()
    with pytest.raises(ValueError, match=r"UNFINISHED agent .*--force"):
        data.build("walker2d", "expert", 10, assets=a)


@pytest.mark.parametrize("env,message", [
    ("Walker2d-v4", "error: --env 'Walker2d-v4': datasets are built in Walker2d-v5"),
    ("hopper-v3", "error: --env 'hopper-v3': datasets are built in Hopper-v5"),
])
def test_data_build_refuses_another_simulator_version(tmp_path, monkeypatch, capsys, env, message):
    from control import data
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    with pytest.raises(SystemExit) as e:
        data.main(["build", "--env", env, "--kind", "medium", "--steps", "10"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize("args,message", [
    (["--total-steps", "0"], "error: --total-steps 0: must be >= 1"),
    (["--total-steps", "-5"], "error: --total-steps -5: must be >= 1"),
    (["--snapshot-every", "0"], "error: --snapshot-every 0: must be >= 1"),
    (["--env", "ant"], "error: unknown environment 'ant'"),
])
def test_agent_cli_refuses_bad_budgets_before_training(tmp_path, capsys, args, message):
    from control import agent
    with pytest.raises(SystemExit) as e:
        agent.main(["--env", "walker2d", *args, "--assets", str(tmp_path / "as"), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "as").exists()  # nothing written


def test_a_fresh_agent_run_never_adds_its_snapshots_to_another_runs(tmp_path):
    from control.agent import AgentConfig, train_agent
    assets = tmp_path / "assets"
    _snap(assets / "walker2d", 51200)
    with pytest.raises(ValueError, match=r"already holds 1 snapshots of another run .*empty --assets"):
        train_agent(AgentConfig("walker2d", total_steps=512, assets=str(assets), workdir=str(tmp_path / "w")))
    assert sorted(p.name for p in (assets / "walker2d").iterdir()) == ["snap_00051200.npz"]
