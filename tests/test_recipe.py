"""End-to-end tests of recipes/iwsft_distributed.py on the tiny random Qwen2 model, on CPU (gloo).

Every run is a subprocess (``python recipe.py`` for one process, ``torch.distributed.run`` for two), exactly as
``tune run`` launches it. Expectations are independent of the recipe: losses are compared between runs that must
agree (reference strategies, resume, gradient accumulation), weights are read back from the saved safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "iwsft_distributed.py"
CONFIGS = REPO / "configs"


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from iwsft.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets") / "tiny")


def run_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def path_overrides(assets, out_dir) -> list:
    return [f"checkpoint_dir={assets['checkpoint_dir']}", f"dataset.data_files={assets['data']}",
            f"output_dir={out_dir}"]


def run_recipe(assets, out_dir, *overrides, config="tiny_cpu", nproc=1, timeout=240, wrapper=None):
    """Run the recipe (through the script ``wrapper``, if given); return the parsed metric log (one dict per step)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(wrapper)] if wrapper is not None else []
    cmd += [str(RECIPE), "--config", str(CONFIGS / f"{config}.yaml"), *path_overrides(assets, out_dir),
            *overrides]
    proc = subprocess.run(cmd, cwd=str(Path(out_dir).parent), env=run_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return read_metrics(out_dir)


def read_metrics(out_dir) -> list:
    """Parse torchtune's DiskLogger lines ``Step N | key:value key:value``."""
    rows = []
    for f in sorted((Path(out_dir) / "logs").glob("log_*.txt")):
        for line in f.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if not m:
                continue
            row = {"step": int(m.group(1))}
            for kv in m.group(2).split():
                k, v = kv.split(":", 1)
                row[k] = float(v)
            rows.append(row)
    return rows


def load_weights(path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("model-*.safetensors"))
    assert files, f"no model-*.safetensors in {path}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def losses(rows, key="loss"):
    return [r[key] for r in rows]


def assert_hf_loads_and_generates(ckpt_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir))
    tok = AutoTokenizer.from_pretrained(str(ckpt_dir))
    ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    return model


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def base_run(tiny_assets, tmp_path_factory):
    """1 process, full FT, iw-SFT with the precomputed reference: 2 epochs x 3 steps (reused by several tests)."""
    out = tmp_path_factory.mktemp("base") / "run"
    rows = run_recipe(tiny_assets, out)
    return out, rows


def test_one_process_iwsft_logs_weights_and_learns(base_run):
    out, rows = base_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "nll", "lr", "tokens_per_second_per_gpu", "weight_mean", "weight_ess", "log_ratio_mean"):
        assert all(key in r for r in rows), key
    # Step 1: q = p_ref exactly, so every weight is 1 and the weighted loss is the NLL.
    assert rows[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(rows[0]["nll"], rel=1e-6)
    # Training lowers the NLL, so q moves away from p_ref on the training data and the weights grow above 1.
    assert rows[-1]["nll"] < rows[0]["nll"]
    assert rows[-1]["weight_mean"] > 1.0 and rows[-1]["log_ratio_mean"] > 0
    assert (out / "reference_logprobs.pt").is_file()
    assert (out / "epoch_1" / "config.json").is_file()
    for epoch in (0, 1):  # every finished save is marked complete, and the marker lists what it covers
        marker = json.loads((out / f"epoch_{epoch}" / "CHECKPOINT_COMPLETE").read_text())
        assert marker["epoch"] == epoch and marker["global_step"] == 3 * (epoch + 1)
        assert {"config.json", "model-00001-of-00001.safetensors"} <= set(marker["files"])
    state = torch.load(out / "recipe_state" / "recipe_state.pt", weights_only=True)
    assert state["epochs_run"] == 1  # written for the intermediate epoch only


# Runs the recipe given as argv[1] in-process, but the job dies (os._exit, no cleanup) right after the checkpointer
# has written the first weight file of its first checkpoint.
DIE_DURING_SAVE = """
import os, runpy, sys
import torchtune.training.checkpointing._checkpointer as ckpt_mod
_save_file = ckpt_mod.save_file
def save_file_then_die(*args, **kwargs):
    _save_file(*args, **kwargs)
    os._exit(17)
ckpt_mod.save_file = save_file_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_crash_while_saving_never_leaves_a_checkpoint_that_looks_complete(base_run, tiny_assets, tmp_path):
    out, _ = base_run
    run = tmp_path / "run"
    shutil.copytree(out, run)  # a finished run: recipe_state.pt names epoch_0, which is complete
    state_before = (run / "recipe_state" / "recipe_state.pt").read_bytes()
    wrapper = tmp_path / "die_during_save.py"
    wrapper.write_text(DIE_DURING_SAVE)
    # A new run into the same output_dir dies while writing its epoch_0.
    with pytest.raises(AssertionError, match=r"recipe failed \(17\)"):
        run_recipe(tiny_assets, run, "optimizer.lr=2.0e-3", wrapper=wrapper)
    assert not (run / "epoch_0" / "CHECKPOINT_COMPLETE").exists()
    assert (run / "epoch_0" / "model-00001-of-00001.safetensors").is_file()  # the half-written epoch is there...
    # ...the fresh run set the earlier run's epochs and resume state aside (moved, not lost), so neither its
    # files nor a resume can mix with the earlier run...
    (previous,) = run.glob("previous_run_*")
    assert (previous / "epoch_1" / "CHECKPOINT_COMPLETE").is_file() and not (run / "epoch_1").exists()
    assert not (run / "recipe_state" / "recipe_state.pt").exists()
    assert (previous / "recipe_state" / "recipe_state.pt").read_bytes() == state_before
    with pytest.raises(AssertionError, match="recipe_state.pt does not exist"):
        run_recipe(tiny_assets, run, "resume_from_checkpoint=true")
    # ...and even with that state put back by hand (it names epoch_0), resume refuses the half-written epoch.
    (run / "recipe_state").mkdir()
    os.replace(previous / "recipe_state" / "recipe_state.pt", run / "recipe_state" / "recipe_state.pt")
    with pytest.raises(AssertionError, match="epoch_0 has no CHECKPOINT_COMPLETE marker"):
        run_recipe(tiny_assets, run, "resume_from_checkpoint=true")


def test_resume_continues_the_same_loss_curve(base_run, tiny_assets, tmp_path):
    out, rows = base_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "epoch_1")  # as if the job died during the last epoch
    shutil.rmtree(resumed / "logs")
    cache_mtime = (resumed / "reference_logprobs.pt").stat().st_mtime_ns
    new_rows = run_recipe(tiny_assets, resumed, "resume_from_checkpoint=true")
    assert [r["step"] for r in new_rows] == [4, 5, 6]
    assert losses(new_rows) == pytest.approx(losses(rows[3:]), rel=1e-5)
    assert losses(new_rows, "lr") == pytest.approx(losses(rows[3:], "lr"), rel=1e-6)
    assert (resumed / "reference_logprobs.pt").stat().st_mtime_ns == cache_mtime  # reused, not recomputed
    a, b = load_weights(out / "epoch_1"), load_weights(resumed / "epoch_1")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_model_reference_gives_the_same_weights_as_precomputed(base_run, tiny_assets, tmp_path):
    _, rows = base_run
    rows_m = run_recipe(tiny_assets, tmp_path / "run", "reference.strategy=model")
    for key in ("loss", "weight_mean", "weight_min", "weight_max", "log_ratio_mean"):
        assert losses(rows_m, key) == pytest.approx(losses(rows, key), rel=1e-4, abs=1e-6), key
    assert not (tmp_path / "run" / "reference_logprobs.pt").exists()


def test_ema_q_with_decay_0_is_the_current_model(base_run, tiny_assets, tmp_path):
    _, rows = base_run
    rows_e = run_recipe(tiny_assets, tmp_path / "run", "weighting.q=ema", "weighting.ema_decay=0.0")
    for key in ("loss", "weight_mean", "weight_max", "log_ratio_mean"):
        assert losses(rows_e, key) == pytest.approx(losses(rows, key), rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_ema_q_with_decay_1_stays_at_the_reference(tiny_assets, tmp_path):
    rows = run_recipe(tiny_assets, tmp_path / "run", "weighting.q=ema", "weighting.ema_decay=1.0", nproc=2)
    assert all(r["weight_mean"] == pytest.approx(1.0, abs=1e-5) for r in rows)  # q never moves: q = p_ref
    assert all(r["loss"] == pytest.approx(r["nll"], rel=1e-5) for r in rows)
    assert rows[-1]["nll"] < rows[0]["nll"]


def test_gradient_accumulation_matches_a_bigger_batch(tiny_assets, tmp_path):
    common = ["epochs=1", "max_steps_per_epoch=2", "shuffle=false", "clip_grad_norm=null"]
    run_recipe(tiny_assets, tmp_path / "big", "batch_size=2", "gradient_accumulation_steps=1", *common)
    run_recipe(tiny_assets, tmp_path / "acc", "batch_size=1", "gradient_accumulation_steps=2", *common)
    big, acc = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert losses(acc) == pytest.approx(losses(big), rel=1e-5)
    assert acc[1]["weight_mean"] != pytest.approx(1.0)  # the second step really is importance-weighted
    a, b = load_weights(tmp_path / "big" / "epoch_0"), load_weights(tmp_path / "acc" / "epoch_0")
    start = load_weights_from_file(tiny_assets["weights"])
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)  # Adam amplifies fp noise on ~0 grads
        moved = max(moved, (a[k] - start[k]).abs().max().item())
    assert moved > 1e-4  # the update is not trivially zero


def load_weights_from_file(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_process_fsdp_iwsft_full_and_checkpoint_loads_in_transformers(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rows = run_recipe(tiny_assets, out, nproc=2)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows[-1]["nll"] < rows[0]["nll"]
    model = assert_hf_loads_and_generates(out / "epoch_1")
    saved = load_weights(out / "epoch_1")
    hf = {k: v for k, v in model.state_dict().items()}
    torch.testing.assert_close(hf["model.layers.0.self_attn.q_proj.weight"],
                               saved["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
def test_two_process_model_reference_equals_precomputed(tiny_assets, tmp_path):
    a = run_recipe(tiny_assets, tmp_path / "pre", nproc=2)
    b = run_recipe(tiny_assets, tmp_path / "mod", "reference.strategy=model", nproc=2)
    for key in ("loss", "weight_mean", "weight_max", "log_ratio_mean"):
        assert losses(b, key) == pytest.approx(losses(a, key), rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_two_process_sft_has_unit_weights_and_no_reference(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rows = run_recipe(tiny_assets, out, "method=sft", nproc=2)
    assert all(r["loss"] == pytest.approx(r["nll"], rel=1e-6) for r in rows)
    assert not any("weight_mean" in r for r in rows)
    assert not (out / "reference_logprobs.pt").exists()
    assert rows[-1]["nll"] < rows[0]["nll"]


@pytest.mark.slow
def test_two_process_lora_adapters_off_saves_merged_and_adapter(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rows = run_recipe(tiny_assets, out, config="tiny_cpu_lora", nproc=2)
    assert rows[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)  # adapters start at zero: q = p_ref
    assert rows[-1]["weight_mean"] != pytest.approx(1.0)
    marker = json.loads((out / "epoch_1" / "CHECKPOINT_COMPLETE").read_text())
    for name in ("adapter_model.safetensors", "adapter_config.json", "adapter_model.pt"):
        assert (out / "epoch_1" / "adapter" / name).is_file(), name
        assert f"adapter/{name}" in marker["files"], name  # the marker is written after the adapter is moved
    assert_hf_loads_and_generates(out / "epoch_1")
    merged, base = load_weights(out / "epoch_1"), load_weights_from_file(tiny_assets["weights"])
    assert set(merged) <= set(base)  # merged checkpoint has the base model's keys only
    assert (merged["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
            ).abs().max() > 0


@pytest.mark.slow
def test_lora_precomputed_equals_adapters_off_and_resumes(tiny_assets, tmp_path):
    a = run_recipe(tiny_assets, tmp_path / "off", config="tiny_cpu_lora")
    b = run_recipe(tiny_assets, tmp_path / "pre", "reference.strategy=precomputed", config="tiny_cpu_lora")
    for key in ("loss", "weight_mean", "log_ratio_mean"):
        assert losses(b, key) == pytest.approx(losses(a, key), rel=1e-4, abs=1e-6), key
    resumed = tmp_path / "res"
    shutil.copytree(tmp_path / "off", resumed)
    shutil.rmtree(resumed / "epoch_1")
    shutil.rmtree(resumed / "logs")
    c = run_recipe(tiny_assets, resumed, "resume_from_checkpoint=true", config="tiny_cpu_lora")
    assert [r["step"] for r in c] == [4, 5, 6]
    assert losses(c) == pytest.approx(losses(a)[3:], rel=1e-5)


@pytest.mark.slow
def test_token_level_weights(tiny_assets, tmp_path):
    # 2 processes: the token-level statistics gather a different number of tokens from each rank
    rows = run_recipe(tiny_assets, tmp_path / "run", "weighting.level=token", "weighting.clip_min=0.2",
                      "weighting.clip_max=1.8", nproc=2)
    assert rows[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert all(0.2 - 1e-6 <= r["weight_min"] and r["weight_max"] <= 1.8 + 1e-6 for r in rows)
    assert rows[-1]["nll"] < rows[0]["nll"]


def test_missing_resume_state_fails_early_with_a_clear_message(tiny_assets, tmp_path):
    with pytest.raises(AssertionError, match="resume_from_checkpoint=true but"):
        run_recipe(tiny_assets, tmp_path / "run", "resume_from_checkpoint=true", "epochs=1")


@pytest.mark.slow
def test_two_process_resume_continues_the_same_loss_curve(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rows = run_recipe(tiny_assets, out, nproc=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "epoch_1")
    shutil.rmtree(resumed / "logs")
    new_rows = run_recipe(tiny_assets, resumed, "resume_from_checkpoint=true", nproc=2)
    assert [r["step"] for r in new_rows] == [4, 5, 6]
    assert losses(new_rows) == pytest.approx(losses(rows[3:]), rel=1e-5)
    assert losses(new_rows, "weight_mean") == pytest.approx(losses(rows[3:], "weight_mean"), rel=1e-5)


def test_quality_weighted_sft_matches_an_independent_computation(tiny_assets, tmp_path):
    """SFT(Q): step 1's loss is Σ_b (q_b / mean q) · NLL_b / (label tokens), recomputed here with transformers."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from transformers import AutoModelForCausalLM

    from iwsft.tune.datasets import s1k_dataset

    rows = run_recipe(tiny_assets, tmp_path / "run", "method=sft", "quality.use=weight",
                      "dataset.quality_column=quality", "shuffle=false", "epochs=1", "max_steps_per_epoch=1")
    ckpt = Path(tiny_assets["checkpoint_dir"])
    tok = qwen2_5_tokenizer(path=str(ckpt / "vocab.json"), merges_file=str(ckpt / "merges.txt"),
                            special_tokens_path=str(ckpt / "tokenizer.json"), max_seq_len=512)
    ds = s1k_dataset(tok, source="json", data_files=tiny_assets["data"], quality_column="quality")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32)
    weighted = plain = tokens = 0.0
    for i in range(2):  # shuffle=false, one process, batch_size 2: the first batch is rows 0 and 1
        sample = ds[i]
        ids = torch.tensor(sample["tokens"]).unsqueeze(0)
        target = torch.tensor(sample["labels"])[1:]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        keep = target != -100
        nll = -logp[keep].gather(1, target[keep].unsqueeze(1)).sum().item()
        weighted += sample["quality"] / float(ds.quality.mean()) * nll
        plain += nll
        tokens += keep.sum().item()
    assert rows[0]["nll"] == pytest.approx(plain / tokens, rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(weighted / tokens, rel=1e-4)
    assert abs(rows[0]["loss"] - rows[0]["nll"]) > 1e-3  # the quality weights really changed the loss


def test_quality_sampling_iwsft_runs_and_weights_start_at_one(tiny_assets, tmp_path):
    rows = run_recipe(tiny_assets, tmp_path / "run", "quality.use=sample", "dataset.quality_column=quality",
                      "epochs=1", "max_steps_per_epoch=2")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)  # iw-SFT(Q): q = p_ref at the first step
