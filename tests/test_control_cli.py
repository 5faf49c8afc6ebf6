"""The experiments script's user-facing behaviour: refusals before training, one-line errors, help, reuse lines,
the table header's evaluation warning. Finished runs are written by hand (no training) unless stated."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from control import experiments as ex
from control.episodes import Episodes, load_d4rl_hdf5, write_d4rl_hdf5
from control.train import state_hash

REPO = Path(__file__).resolve().parents[1]


def hopper_like(n=8, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, size=n)
    N = int(lengths.sum())
    return Episodes(rng.normal(size=(N, 11)), rng.uniform(-1, 1, size=(N, 3)), rng.normal(size=N),
                    np.concatenate([[0], np.cumsum(lengths)]), np.zeros(n, bool), env="hopper", source="test")


def fake_run(run_dir: Path, tcfg, dataset: dict, score=12.5, init_hash=None):
    """A finished run as save_run leaves it (result.json last), without training."""
    run_dir.mkdir(parents=True)
    torch.save({"w": torch.arange(3.0)}, run_dir / "policy.pt")
    res = {"config": json.loads(json.dumps(asdict(tcfg))), "dataset": dataset, "final": {"score_mean": score},
           "init_hash": init_hash}
    (run_dir / "result.json").write_text(json.dumps(res))


def test_filter_that_keeps_nothing_is_refused_before_bc_trains(tmp_path):
    path = tmp_path / "hopper_tiny-v2.hdf5"
    write_d4rl_hdf5(hopper_like(8), path)
    cfg = ex.ExperimentConfig(d4rl_file=str(path), algos=("bc", "filtered_bc"), seeds=1, bc_steps=30, steps=20,
                              out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"top 0.1 of episodes by return, which of 8 episodes is none.*"
                                         r"--filter-fraction >= 0.125"):
        ex.run_all(cfg)
    assert not (tmp_path / "out" / "hopper_tiny-v2" / "bc").exists()  # nothing trained
    # the option reaches the trainer's config (floor(0.25 * 8) = 2 episodes)
    assert ex.train_config(ex.ExperimentConfig(filter_fraction=0.25), "filtered_bc", 0).filter_fraction == 0.25
    ex.check_filter(ex.ExperimentConfig(algos=("bc", "filtered_bc"), filter_fraction=0.125), hopper_like(8))


def test_settings_refusal_lists_every_differing_run(tmp_path):
    data = hopper_like()
    old = ex.ExperimentConfig(algos=("bc", "iwsft"), seeds=1)
    root = tmp_path / "root"
    fake_run(root / "bc" / "seed0", ex.train_config(old, "bc", 0), data.summary())
    bc_hash = state_hash(torch.load(root / "bc" / "seed0" / "policy.pt"))
    fake_run(root / "iwsft" / "seed0", ex.train_config(old, "iwsft", 0), data.summary(), init_hash=bc_hash)
    ex.check_all_finished_runs(old, root, data.summary())  # same settings: nothing to refuse
    new = ex.ExperimentConfig(algos=("bc", "iwsft"), seeds=1, reduction="step")
    with pytest.raises(ValueError, match="finished run with other settings in 2 run folder") as e:
        ex.check_all_finished_runs(new, root, data.summary())
    assert "bc/seed0: {'reduction': ('episode', 'step')}" in str(e.value)
    assert "iwsft/seed0: {'reduction': ('episode', 'step')}" in str(e.value)


def test_reused_run_prints_a_skipped_line(tmp_path, capsys):
    data = hopper_like()
    cfg = ex.ExperimentConfig(out=str(tmp_path), seeds=1, d4rl_file="tiny.hdf5")
    fake_run(tmp_path / "tiny" / "bc" / "seed0", ex.train_config(cfg, "bc", 0), data.summary(), score=12.5)
    lines = ex.run_seed(cfg, 0, data, algos=["bc"])
    assert lines == [f"bc seed0: skipped, finished run in {tmp_path / 'tiny' / 'bc' / 'seed0'} reused (final 12.5)"]
    assert lines[0] in capsys.readouterr().out


def test_table_header_repeats_the_eval_version_warning(tmp_path):
    path = tmp_path / "hopper_tiny-v2.hdf5"
    write_d4rl_hdf5(hopper_like(), path)
    with pytest.warns(UserWarning, match="Hopper-v3 in Hopper-v5"):
        data = load_d4rl_hdf5(path, eval_env="Hopper-v5")
    (tmp_path / "dataset.json").write_text(json.dumps(data.summary()))
    header = ex.write_table(tmp_path)
    line = next(x for x in header.splitlines() if x.startswith("Evaluated in"))
    assert line.startswith("Evaluated in `Hopper-v5` (warning: ") and "not comparable with published D4RL" in line
    # the default (-v4) carries no warning
    (tmp_path / "dataset.json").write_text(json.dumps(load_d4rl_hdf5(path).summary()))
    assert "warning" not in ex.write_table(tmp_path)


def test_malformed_file_gives_one_line_error_and_exit_2(tmp_path):
    path = tmp_path / "hopper_bad.hdf5"
    with h5py.File(path, "w") as f:  # a D4RL -v0 style file: no timeouts
        f["observations"], f["actions"] = np.zeros((4, 11)), np.zeros((4, 3))
        f["rewards"], f["terminals"] = np.zeros(4), np.zeros(4, bool)
    p = subprocess.run([sys.executable, "-m", "control.experiments", "--d4rl-file", str(path), "--out",
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "no 'timeouts' field" in p.stderr


def test_help_shows_defaults_and_every_option_has_help():
    parser = ex.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help line"
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: 2000)" in text and "(default: episode)" in text
    assert "contradicts" in text  # --env says what it changes
    docs = (REPO / "docs" / "control.md").read_text()
    for t in (text, docs):  # one measured figure for the exact mode, with its conditions
        assert "0.4 s" not in t and "832 ms" in t


@pytest.mark.parametrize("flag", ["--full-episodes", "--bc-full-episodes"])
def test_negative_batch_episodes_are_refused_naming_the_flag(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        ex.main([flag, "-3", "--seeds", "1", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} -3: must be >= 0") and "sampled approximation" in err
    assert not (tmp_path / "out").exists()  # refused before the dataset build


def _res(seed, score, weights=None, curve_max=None, ess=None):
    r = {"config": {"seed": seed, "clip_max": 1000.0}, "final": {"score_mean": score}, "curve": [{"step": 1}]}
    if weights is not None:
        r["episode_weights"] = weights
        r["curve"].append({"step": 2, "weight_max": curve_max, "weight_ess": ess})
    return r


def test_table_reports_paired_differences_with_a_hand_computed_interval():
    # iw-SFT − filtered BC on the seeds both finished (0, 1, 2; seed 3 has no iw-SFT run): 1, 2, 3
    # mean 2, sample std 1, t(0.975, df 2) = 4.303 -> half-width 4.303 / sqrt(3) = 2.484 -> [-0.5, +4.5]
    results = {"filtered_bc": [_res(0, 80.0), _res(1, 70.0), _res(2, 60.0), _res(3, 50.0)],
               "iwsft": [_res(2, 63.0), _res(0, 81.0), _res(1, 72.0)]}
    rows = ex.paired_lines(results)
    assert "| iwsft − filtered_bc | 3 | +2.0 | [-0.5, +4.5] | +1.0, +2.0, +3.0 |" in rows
    assert not any(r.startswith("| filtered_bc − bc") for r in rows)  # no BC runs: no such row
    one = ex.paired_lines({"filtered_bc": [_res(0, 80.0)], "iwsft": [_res(0, 70.5)]})
    assert "| iwsft − filtered_bc | 1 | -9.5 | n/a (1 seed) | -9.5 |" in one
    assert ex.paired_lines({"iwsft": [_res(0, 1.0)]}) == []  # nothing to pair


def test_table_reports_the_final_weights_and_how_many_sit_at_the_clip():
    w = [1000.0, 999.9995, 0.5, 1e-9]  # two at the clip (the second within fp32 rounding of it)
    r = _res(4, 41.7, w, 1000.0001, 0.02574)
    r["episode_returns"] = [1245.0, 3000.0, 2000.0, 1500.0]  # the top weight sits on the worst episode: rank 4 of 4
    rows = ex.weight_lines({"iwsft": [r]})
    assert "| iwsft | 4 | 4 | 1000 | 0.026 | 2 | 1245 (4 of 4) | 41.7 |" in rows


@pytest.mark.parametrize("name,kind", [
    ("minari:iwsft/hopper/medium-replay-v0", "medium-replay"), ("iwsft/walker2d/medium-replay-50k-seed3-v0", "medium-replay"),
    ("hopper_medium_replay-v2", "medium-replay"), ("iwsft/halfcheetah/medium-expert-v0", "medium-expert"),
    ("mujoco/hopper/expert-v0", "expert"), ("walker2d_medium-v2", "medium"), ("hopper_tiny-v2", None),
    ("mediumish-v0", None)])
def test_published_context_reads_the_dataset_kind_from_its_name(name, kind):
    from control.published import dataset_kind
    assert dataset_kind(name) == kind


def test_table_prints_corl_context_only_where_published(tmp_path):
    ds = {"source": "minari:iwsft/hopper/medium-replay-v0", "env": "hopper", "episodes": 1, "steps": 1}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    line = next(x for x in ex.write_table(tmp_path).splitlines() if x.startswith("Context"))
    # CORL README, last scores, hopper-medium-replay-v2: 10% BC 70.42 ± 8.66, IQL 97.43 ± 6.39
    assert "a different data source" in line and "10%BC 70.4 ± 8.7" in line and "IQL 97.4 ± 6.4" in line
    (tmp_path / "dataset.json").write_text(json.dumps({**ds, "source": "minari:iwsft/hopper/expert-v0"}))
    assert "Context" not in ex.write_table(tmp_path)  # CORL publishes no gym-mujoco expert rows


def test_grid_refuses_an_environment_without_snapshots_before_building_anything(tmp_path, monkeypatch):
    import control.agent
    real = control.agent.check_agent_finished

    def finished(env, *a, **k):
        if env == "walker2d":  # as on a fresh clone before its agent is trained
            raise FileNotFoundError("no behaviour-policy snapshots in control/assets/walker2d: train them")
        return real(env, *a, **k)

    monkeypatch.setattr(control.agent, "check_agent_finished", finished)
    monkeypatch.setattr(ex, "build", lambda *a, **k: pytest.fail("a dataset was built before the refusal"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    cfg = ex.ExperimentConfig(env="hopper,walker2d", dataset="medium,medium-replay", out=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="control/assets/walker2d"):
        ex.run_all(cfg)
    with pytest.raises(ValueError, match="several environments only go with datasets to build"):
        ex.run_all(replace(cfg, dataset="medium,mujoco/hopper/medium-v0"))
    with pytest.raises(ValueError, match="empty entry"):
        ex.run_all(replace(cfg, dataset="medium,,expert"))
    assert not (tmp_path / "out").exists()


def test_finished_run_on_other_data_with_the_same_summary_is_refused(tmp_path):
    data = hopper_like()
    swapped = hopper_like()
    swapped.actions = -swapped.actions  # same name, episodes, steps and returns; other contents
    assert {k: v for k, v in data.summary().items() if k != "content_sha256"} == \
        {k: v for k, v in swapped.summary().items() if k != "content_sha256"}
    cfg = ex.ExperimentConfig(algos=("bc",), seeds=1)
    tcfg = ex.train_config(cfg, "bc", 0)
    fake_run(tmp_path / "new", tcfg, data.summary())
    changed = ex.settings_changed(tmp_path / "new", tcfg, swapped.summary())
    assert list(changed) == ["dataset.content_sha256"]  # only the differing field, not the whole record
    # a run saved before the hash was recorded is matched by its summary (as it was then)
    legacy = {k: v for k, v in data.summary().items() if k != "content_sha256"}
    fake_run(tmp_path / "legacy", tcfg, legacy)
    assert ex.settings_changed(tmp_path / "legacy", tcfg, data.summary()) == {}
    assert ex.settings_changed(tmp_path / "legacy", tcfg, {**data.summary(), "steps": 1}) == \
        {"dataset.steps": (legacy["steps"], 1)}


def test_intermediate_evaluation_size_does_not_matter_without_intermediate_evaluations(tmp_path):
    data = hopper_like()
    off5 = ex.train_config(ex.ExperimentConfig(eval_every=0, eval_episodes=5), "bc", 0)
    fake_run(tmp_path / "r", off5, data.summary())
    assert ex.settings_changed(tmp_path / "r", replace(off5, eval_episodes=7), data.summary()) == {}
    on5 = ex.train_config(ex.ExperimentConfig(eval_every=100, eval_episodes=5), "bc", 0)
    fake_run(tmp_path / "s", on5, data.summary())
    assert ex.settings_changed(tmp_path / "s", replace(on5, eval_episodes=7), data.summary()) == \
        {"eval_episodes": (5, 7)}


@pytest.mark.parametrize("args,message", [
    (["--quick", "--steps", "20"], "error: --quick sets --steps itself (steps=500); drop --steps or drop --quick."),
    (["--cpu-grid", "--steps", "20", "--bc-steps", "5"],
     "error: --cpu-grid sets --bc-steps, --steps itself (bc_steps=3000, steps=400); drop --bc-steps, --steps or "
     "drop --cpu-grid."),
    (["--cpu-grid", "--env", "hopper"], "error: --cpu-grid sets --env itself (env=hopper,walker2d,halfcheetah)"),
    (["--cpu-grid", "--quick"], "error: --quick and --cpu-grid are two presets; pick one."),
    (["--algos", ","], "error: --algos is empty"),
    (["--bc-steps", "0"], "error: --bc-steps 0: must be >= 1."),
    (["--dataset-steps", "-100"], "error: --dataset-steps -100: must be >= 1."),
    (["--filter-fraction", "nan"], "error: --filter-fraction nan: must be in (0, 1]"),
    (["--filter-fraction", "inf"], "error: --filter-fraction inf: must be in (0, 1]"),
    (["--eval-env", "Hopper-v3"], "error: --eval-env 'Hopper-v3' cannot be made here"),
    (["--eval-env", "hopper"], "error: --eval-env 'hopper' cannot be made here"),
])
def test_bad_flags_are_refused_in_one_line_before_anything_is_built(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        ex.main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit):
        ex.main(["--out", str(tmp_path / "afile")])
    assert "--out " in capsys.readouterr().err and (tmp_path / "afile").read_text() == "keep me"


def test_bc_only_table_does_not_describe_fine_tuning(tmp_path):
    data = hopper_like()
    (tmp_path / "dataset.json").write_text(json.dumps(data.summary()))
    tcfg = ex.train_config(ex.ExperimentConfig(), "bc", 0)
    fake_run(tmp_path / "bc" / "seed0", tcfg, data.summary())
    res = json.loads((tmp_path / "bc" / "seed0" / "result.json").read_text())
    res.update(curve=[{"step": 1, "loss": 1.0}], wall_time_s=1.0, final={"score_mean": 3.0, "episodes": 2})
    (tmp_path / "bc" / "seed0" / "result.json").write_text(json.dumps(res))
    header = next(x for x in ex.write_table(tmp_path).splitlines() if x.startswith("Evaluated in"))
    assert "fine-tuning" not in header and "importance weights" not in header
    assert header.endswith("BC sampled approximation (512 steps per batch).")


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_stopping_a_worker_run_stops_its_workers_and_keeps_nothing_half_written(tmp_path):
    import signal
    import time
    path = tmp_path / "hopper_tiny-v2.hdf5"
    write_d4rl_hdf5(hopper_like(8), path)
    p = subprocess.Popen([sys.executable, "-m", "control.experiments", "--d4rl-file", str(path), "--algos", "bc",
                          "--seeds", "2", "--workers", "2", "--bc-steps", "1000000", "--out", str(tmp_path / "out")],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    def workers():  # the pool's spawned processes
        return [c for c in _children(p.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    deadline = time.time() + 120
    while time.time() < deadline and len(workers()) < 2:
        time.sleep(0.5)
    started = workers()
    assert len(started) == 2, "the worker processes did not start"
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    time.sleep(1)
    assert not [w for w in started if Path(f"/proc/{w}").exists()], "workers outlived the stopped run"
    assert not list((tmp_path / "out").glob("*/bc/seed*/result.json"))


@pytest.mark.parametrize("flag,value,message", [
    ("--eval-every", "-1", "error: --eval-every -1 must be >= 0"), ("--batch-size", "0", "error: --batch-size 0 must be >= 1"),
    ("--final-eval-episodes", "0", "error: --final-eval-episodes 0 must be >= 1"),
    ("--refresh-every", "0", "error: --refresh-every 0 must be >= 1")])
def test_trainer_settings_are_refused_by_their_flag_name(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        ex.main([flag, value, "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith(message)


def test_a_repeated_grid_entry_runs_once():
    cfgs = ex.expand_grid(ex.ExperimentConfig(env="hopper,hopper", dataset="medium, medium,expert"))
    assert [(c.env, c.dataset) for c in cfgs] == [("hopper", "medium"), ("hopper", "expert")]


def test_one_writer_per_out_folder(tmp_path):
    """A live process's lock refuses a second writer, naming it; a dead process's lock is taken over and removed."""
    import os
    import subprocess
    import sys
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ex.LOCK).write_text(str(live.pid))
        with pytest.raises(ValueError, match=rf"another control.experiments \(pid {live.pid}\) is writing there"):
            with ex.out_lock(out):
                pass
    finally:
        live.kill()
        live.wait()
    with ex.out_lock(out):  # that process is gone: its lock is stale
        assert (out / ex.LOCK).read_text() == str(os.getpid())
    assert not (out / ex.LOCK).exists()
