"""The experiments script's user-facing behaviour: refusals before training, one-line errors, help, reuse lines,
the table header's evaluation warning. Finished runs are written by hand (no training) unless stated."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
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
