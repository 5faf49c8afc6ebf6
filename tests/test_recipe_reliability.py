"""The recipe never trains silently on nothing or on NaN, never resumes from damaged state, never shares output_dir.

End-to-end on the tiny random Qwen2 (CPU, gloo), each run a subprocess as ``tune run`` starts it. Faults are
injected from outside the recipe: a dataset component that blanks labels or poisons one sample
(``tests/faulty_data.py``), bytes overwritten or cut in saved files, a lock file left by a dead process, a second
run started while the first one holds ``output_dir``. Expectations are read from the run's own outputs (exit code,
metric log, ``run_summary.json``, files on disk), not from the recipe's code.
"""

from __future__ import annotations

import json
import re
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_recipe import CONFIGS, RECIPE, load_weights, path_overrides, read_metrics, run_env, tiny_assets  # noqa: F401

TESTS = Path(__file__).resolve().parent


def launch(assets, out_dir, *overrides, wrapper=None, config="tiny_cpu"):
    cmd = [sys.executable] + ([str(wrapper)] if wrapper else []) + [
        str(RECIPE), "--config", str(CONFIGS / f"{config}.yaml"), *path_overrides(assets, out_dir), *overrides]
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.Popen(cmd, cwd=str(Path(out_dir).parent), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(assets, out_dir, *overrides, wrapper=None, timeout=240):
    """Run the recipe; return (exit code, combined output)."""
    proc = launch(assets, out_dir, *overrides, wrapper=wrapper)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_ok(assets, out_dir, *overrides, **kw):
    rc, out = run(assets, out_dir, *overrides, **kw)
    assert rc == 0, f"recipe failed ({rc}):\n{out[-6000:]}"
    return out


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "run_summary.json").read_text())


FAULTY = ["dataset._component_=faulty_data.faulty_s1k", "quality.use=weight", "dataset.quality_column=quality",
          "shuffle=false", "batch_size=1", "epochs=1", "max_steps_per_epoch=4"]


# ------------------------------------------------------------------------------ 1. zero label tokens
def test_rows_without_labels_are_dropped_and_empty_steps_skipped_and_nonfinite_steps_skipped(tiny_assets, tmp_path):
    """truncate=true, max_seq_len=45: the tiny rows' prompts are 44 or 45 tokens, so 25 of 32 rows keep no label
    token (dropped, counted); of the 7 left, position 0 is blanked (step 1 trains on nothing) and position 2 is
    poisoned (step 3 is non-finite; skip_nonfinite_steps=1 skips it)."""
    out = tmp_path / "run"
    log = run_ok(tiny_assets, out, *FAULTY, "dataset.truncate=true", "dataset.max_seq_len=45",
                 "dataset.blank_positions=[0]", "dataset.poison_positions=[2]", "skip_nonfinite_steps=1")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4]  # the empty and the non-finite step are not logged at all
    assert all(r["loss"] > 0 and r["nll"] > 0 for r in rows)
    s = summary(out)
    assert s["status"] == "completed"
    assert s["steps_skipped"] == {"no_label_tokens": 1, "non_finite": 1}
    assert s["dataset_rows"]["no_label_tokens"] == 25 and s["dataset_rows"]["kept"] == 7
    assert "dropped 25 rows left with no label tokens after truncation" in log
    assert "step 1: no label tokens in the global batch" in log
    assert "at optimizer step 3" in log and "skip_nonfinite_steps=1" in log
    assert (out / "epoch_0" / "CHECKPOINT_COMPLETE").is_file()
    for v in load_weights(out / "epoch_0").values():
        assert torch.isfinite(v).all()


def test_a_dataset_with_no_trainable_row_refuses_to_start(tiny_assets, tmp_path):
    rc, log = run(tiny_assets, tmp_path / "run", "dataset.truncate=true", "dataset.max_seq_len=40")
    assert rc != 0
    assert "32 rows have no label tokens after truncation to max_seq_len=40" in log
    assert "raise dataset.max_seq_len" in log
    assert not (tmp_path / "run" / "epoch_0").exists()


# ------------------------------------------------------------------------------ 2. non-finite loss
def test_nonfinite_step_stops_the_run_naming_step_samples_and_key(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rc, log = run(tiny_assets, out, *FAULTY, "dataset.poison_positions=[2]")
    assert rc != 0
    assert "non-finite" in log and "at optimizer step 3" in log
    assert "sample ids of the micro-batch(es): rank 0: [2]" in log  # shuffle=false, batch 1: position 2 = id 2
    assert "dataset.quality_column" in log  # the likely key
    assert not (out / "epoch_0").exists()  # nothing saved after (or at) the bad step
    s = summary(out)
    assert s["status"].startswith("stopped: non-finite")
    assert s["steps_skipped"]["non_finite"] == 0  # the step that stopped the run was not skipped: it is the cause
    assert s["stop"]["cause"] == "non_finite" and s["stop"]["step"] == 3 and "rank 0: [2]" in s["stop"]["sample_ids"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert (out / "iwsft_run.lock").read_text() == ""  # the lock was released on the way out


def test_unclipped_unnormalised_weights_are_refused_at_validation():
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("_recipe_rel", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = OmegaConf.load(CONFIGS / "tiny_cpu.yaml")
    cfg.weighting.clip_max = None
    cfg.weighting.temperature = 1000.0
    with pytest.raises(ValueError, match=r"weighting.clip_max=null \(or inf\) needs weighting.normalize=true"):
        mod.validate_config(cfg)
    cfg.weighting.normalize = True  # log-space normalisation cannot overflow: allowed
    mod.validate_config(cfg)
    cfg.skip_nonfinite_steps = -1
    with pytest.raises(ValueError, match="skip_nonfinite_steps"):
        mod.validate_config(cfg)


# ------------------------------------------------------------------ 3, 4, 7: damaged state, the output_dir lock
# Runs the recipe given as argv[1]; its first checkpoint save pauses (holding output_dir) until GO exists.
PAUSE_IN_SAVE = """
import os, runpy, sys, time
import torchtune.training.checkpointing._checkpointer as ckpt_mod
_save_file = ckpt_mod.save_file
state = {"paused": False}
def save_file_and_wait(*args, **kwargs):
    _save_file(*args, **kwargs)
    if not state["paused"]:
        state["paused"] = True
        open(os.environ["IWSFT_TEST_PAUSED"], "w").close()
        deadline = time.time() + 120
        while not os.path.exists(os.environ["IWSFT_TEST_GO"]) and time.time() < deadline:
            time.sleep(0.1)
ckpt_mod.save_file = save_file_and_wait
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def base_run(tiny_assets, tmp_path_factory):
    """A complete 2-epoch run; while it is paused inside its first save, a second run into the same output_dir
    is started and must be refused naming the first run's host and pid."""
    tmp = tmp_path_factory.mktemp("rel_base")
    out = tmp / "run"
    wrapper = tmp / "pause_in_save.py"
    wrapper.write_text(PAUSE_IN_SAVE)
    paused, go = tmp / "paused", tmp / "go"
    os.environ["IWSFT_TEST_PAUSED"], os.environ["IWSFT_TEST_GO"] = str(paused), str(go)
    try:
        first = launch(tiny_assets, out, wrapper=wrapper)
        deadline = time.time() + 180
        while not paused.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert paused.exists(), first.communicate()[0][-4000:]
        lock = out / "iwsft_run.lock"
        holder = json.loads(lock.read_text()) if lock.is_file() else None
        rc2, log2 = run(tiny_assets, out, "epochs=1")
        go.touch()
        log1, _ = first.communicate(timeout=240)
    finally:
        del os.environ["IWSFT_TEST_PAUSED"], os.environ["IWSFT_TEST_GO"]
    assert first.returncode == 0, log1[-5000:]
    return out, holder, first.pid, rc2, log2


def test_a_second_run_into_a_busy_output_dir_is_refused(base_run):
    out, holder, pid, rc2, log2 = base_run
    assert holder is not None and holder["pid"] == pid and holder["host"]
    assert rc2 != 0
    assert "is in use by another run" in log2 and f'"pid": {pid}' in log2 and holder["host"] in log2
    section = re.search(r"see README '([^']+)'", log2).group(1)  # the README section it points to exists
    readme = (TESTS.parent / "README.md").read_text().splitlines()
    assert any(line.lstrip("#").strip() == section for line in readme if line.startswith("#")), section
    assert (out / "epoch_1" / "CHECKPOINT_COMPLETE").is_file()  # the first run finished undisturbed
    assert (out / "iwsft_run.lock").read_text() == ""  # released at the end


def test_resume_refuses_a_weights_file_changed_after_the_save(base_run, tiny_assets, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    f = out / "epoch_0" / "model-00001-of-00001.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:  # overwrite in place, same size: only a checksum can tell
        fh.seek(size // 2)
        fh.write(b"\xff" * 64)
    assert f.stat().st_size == size
    rc, log = run(tiny_assets, out, "resume_from_checkpoint=true")
    assert rc != 0
    assert f"checkpoint file {f} does not match the sha256" in log
    marker = json.loads((out / "epoch_0" / "CHECKPOINT_COMPLETE").read_text())
    assert len(marker["files"]["model-00001-of-00001.safetensors"]["sha256"]) == 64


def test_resume_refuses_a_truncated_recipe_state(base_run, tiny_assets, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    state = out / "recipe_state" / "recipe_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    rc, log = run(tiny_assets, out, "resume_from_checkpoint=true")
    assert rc != 0
    assert f"resume state {state} is unreadable" in log and "resume_from_checkpoint=false" in log
    # torch's own message is quoted whole up to a word boundary, inside a complete sentence (file, cause, fix)
    m = re.search(r"so torch\.load fails \((\w+): (.*?)\)\. Restore it from a copy of output_dir", log)
    assert m, log[-3000:]
    try:
        torch.load(state, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # the oracle: what torch itself says about this file
        assert type(exc).__name__ == m.group(1)
        quoted, full = m.group(2).removesuffix(" ..."), str(exc)
        assert full.startswith(quoted) and (len(full) == len(quoted) or not full[len(quoted)].isalnum())
    else:
        raise AssertionError("the truncated file loads")


def test_resume_refuses_a_damaged_reference_cache(base_run, tiny_assets, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    cache = out / "reference_logprobs.pt"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    rc, log = run(tiny_assets, out, "resume_from_checkpoint=true")
    assert rc != 0
    assert f"reference cache {cache} is unreadable" in log and "reference.strategy=model" in log


def test_fresh_run_recomputes_a_garbage_cache_and_takes_over_a_stale_lock(base_run, tiny_assets, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    cache = out / "reference_logprobs.pt"
    cache.write_bytes(random.Random(195).randbytes(4096))  # fixed garbage (torch.load raises a ValueError on it)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone
    stale = json.dumps({"host": "somehost", "pid": dead.pid, "started": "2026-11-30T00:00:00+00:00"})
    (out / "iwsft_run.lock").write_text(stale)
    shutil.rmtree(out / "logs")
    old_marker = (out / "epoch_1" / "CHECKPOINT_COMPLETE").read_bytes()
    log = run_ok(tiny_assets, out, "epochs=1", "max_steps_per_epoch=1")
    # the earlier run's epochs and resume state are set aside together, never mixed with this run's epoch_0
    (previous,) = out.glob("previous_run_*")
    assert (previous / "epoch_1" / "CHECKPOINT_COMPLETE").read_bytes() == old_marker
    assert (previous / "epoch_0" / "CHECKPOINT_COMPLETE").is_file()
    assert (previous / "recipe_state" / "recipe_state.pt").is_file()
    assert sorted(p.name for p in out.glob("epoch_*")) == ["epoch_0"] and not (out / "recipe_state").exists()
    assert json.loads((out / "epoch_0" / "CHECKPOINT_COMPLETE").read_text())["global_step"] == 1
    assert f"moved the earlier run's epoch_0, epoch_1, recipe_state to {previous}" in log
    assert f"Reference cache {cache} is unreadable" in log and "recomputing" in log
    assert f"taking over the stale lock of a run that is gone ({stale})" in log
    assert torch.load(cache, weights_only=True)["version"] == 1  # a readable cache again
    assert [r["step"] for r in read_metrics(out)] == [1]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_worker_and_frees_output_dir(tiny_assets, tmp_path):
    """The documented clean stop: SIGTERM (or Ctrl-C) to torchrun, which forwards it to its workers."""
    out = tmp_path / "run"
    env = run_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RECIPE),
           "--config", str(CONFIGS / "tiny_cpu.yaml"), *path_overrides(tiny_assets, out), "max_steps_per_epoch=1",
           "epochs=1000"]
    launcher = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "epoch_0" / "CHECKPOINT_COMPLETE").exists():
        time.sleep(0.2)
    assert (out / "epoch_0" / "CHECKPOINT_COMPLETE").exists()
    worker = json.loads((out / "iwsft_run.lock").read_text())["pid"]
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker)  # the rank-0 worker is gone with its launcher
    s = summary(out)  # ...and said how the run ended, and released the lock on its way out
    assert s["status"].startswith("stopped: signal SIGTERM") and s["stop"]["cause"] == "signal SIGTERM"
    assert s["epochs_run"] >= 1
    assert (out / "iwsft_run.lock").read_text() == ""
    from fcntl import LOCK_EX, LOCK_NB, flock

    with open(out / "iwsft_run.lock") as fh:  # nobody holds output_dir any more
        flock(fh.fileno(), LOCK_EX | LOCK_NB)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ review fixes: config, data and path errors
@pytest.fixture(scope="module")
def recipe_mod():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_recipe_rel_cfg", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.load(CONFIGS / "tiny_cpu.yaml")


def _cli(cfg, *overrides):
    """The config as `tune run ... key=value` builds it (OmegaConf dotlist: `inf` stays the string "inf")."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def test_numeric_strings_and_inf_are_numbers_and_junk_names_its_key(recipe_mod):
    cfg = _cli(_tiny_cfg(), "weighting.clip_max=inf")
    assert cfg.weighting.clip_max == "inf"  # what the command line really delivers
    with pytest.raises(ValueError, match=r"clip_max=null \(or inf\) needs weighting.normalize=true"):
        recipe_mod.validate_config(cfg)  # inf = no upper clip: overflows like null
    cfg = _cli(_tiny_cfg(), "weighting.clip_max=inf", "weighting.normalize=true", "weighting.temperature=1e1")
    recipe_mod.validate_config(cfg)
    w = recipe_mod.weighting_config(cfg)
    assert w.clip_max is None and w.temperature == 10.0
    assert recipe_mod.weighting_config(_cli(_tiny_cfg(), "weighting.clip_max=8")).clip_max == 8.0
    for key, bad in (("clip_max", "lots"), ("temperature", "hot"), ("clip_min", "true")):
        with pytest.raises(ValueError, match=rf"weighting\.{key}=.* must be a number"):
            recipe_mod.validate_config(_cli(_tiny_cfg(), f"weighting.{key}={bad}"))


def test_misspelled_keys_of_the_recipe_sections_are_refused_with_a_suggestion(recipe_mod):
    for override, hint in (("weighting.temprature=2", "did you mean weighting.temperature?"),
                           ("reference.stratgy=model", "did you mean reference.strategy?"),
                           ("quality.uses=weight", "did you mean quality.use?"),
                           ("weighting.zzz=1", "known keys: level, temperature")):
        with pytest.raises(ValueError, match=re.escape(hint)):
            recipe_mod.validate_config(_cli(_tiny_cfg(), override))
    for name in sorted(p.stem for p in CONFIGS.glob("*.yaml")):
        from omegaconf import OmegaConf

        assert recipe_mod.unknown_section_keys(OmegaConf.load(CONFIGS / f"{name}.yaml")) == [], name


def test_an_empty_data_file_is_refused_naming_the_file_and_key(tmp_path):
    from iwsft.tune.datasets import load_rows

    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(ValueError, match=rf"dataset\.data_files: {re.escape(str(f))} is empty"):
            load_rows("json", data_files=str(f))
    f = tmp_path / "empty_array.json"
    f.write_text("[]")  # not blank, still no row: datasets' own StopIteration is turned into the same kind of error
    with pytest.raises(ValueError, match="dataset.data_files=.*holds no rows"):
        load_rows("json", data_files=str(f))


def test_a_missing_checkpoint_dir_names_the_key_and_the_download(recipe_mod, tiny_assets, tmp_path):
    cfg = _cli(_tiny_cfg(), f"checkpoint_dir={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match=r"checkpoint_dir=.*nowhere .*does not exist.*tune download"):
        recipe_mod.check_checkpoint_dir(cfg)
    partial_dir = tmp_path / "partial"
    partial_dir.mkdir()
    (partial_dir / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors"):
        recipe_mod.check_checkpoint_dir(_cli(_tiny_cfg(), f"checkpoint_dir={partial_dir}"))
    recipe_mod.check_checkpoint_dir(_cli(_tiny_cfg(), f"checkpoint_dir={tiny_assets['checkpoint_dir']}"))
    # and the recipe calls it before anything else (one short run: it stops before any model is built)
    rc, log = run(tiny_assets, tmp_path / "run", f"checkpoint_dir={tmp_path / 'nowhere'}")
    assert rc != 0 and "checkpoint_dir=" in log and "tune download" in log and "config.json" not in log


def test_changed_training_config_is_listed_key_by_key(recipe_mod):
    old = recipe_mod.training_config(_tiny_cfg(), world_size=2)
    new = recipe_mod.training_config(
        _cli(_tiny_cfg(), "batch_size=4", "weighting.temperature=2", "loss.reduction=sequence", "optimizer.lr=1",
             "epochs=5", "dataset.data_files=/elsewhere.jsonl"), world_size=2)
    assert recipe_mod.config_changes(old, new) == [
        "batch_size: 2 → 4", "dataset.data_files: '/tmp/iwsft_tiny/data/s1k_tiny.jsonl' → '/elsewhere.jsonl'",
        "loss.reduction: 'token' → 'sequence'", "weighting.temperature: 1.0 → 2"]  # lr, epochs: allowed to change
    assert recipe_mod.config_changes(old, recipe_mod.training_config(_tiny_cfg(), world_size=1)) == [
        "world_size: 2 → 1"]
    assert recipe_mod.config_changes(old, recipe_mod.training_config(_cli(_tiny_cfg(), "weighting.temperature=1"),
                                                                     world_size=2)) == []  # 1 == 1.0


def test_resume_with_a_changed_data_order_or_objective_is_refused(base_run, tiny_assets, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    rc, log = run(tiny_assets, out, "resume_from_checkpoint=true", "batch_size=4", "seed=3")
    assert rc != 0
    assert "changes the data order or the objective" in log
    assert "batch_size: 2 → 4" in log and "seed: 0 → 3" in log and "resume_allow_config_change=true" in log
    assert summary(out)["status"].startswith("stopped: error RuntimeError")  # said how this invocation ended
    assert (out / "iwsft_run.lock").read_text() == ""


def test_exception_summaries_never_cut_a_word(recipe_mod):
    long = RuntimeError("first sentence is here. " + "word " * 200)
    assert recipe_mod._exc_summary(long) == "RuntimeError: first sentence is here"
    one = ValueError("x" * 10 + " " + "abcdefghij " * 60)
    text = recipe_mod._exc_summary(one, limit=100)
    assert text.endswith(" ...") and len(text) < 130
    body = text.removeprefix("ValueError: ").removesuffix(" ...")
    assert str(one).startswith(body) and str(one)[len(body)] == " "
