"""The README's first command: one self-curation round (shipped p_ref, curate, SFT vs iw-SFT via `tune run`, eval)."""

import json
from pathlib import Path

import pytest

from iwsft import demo


def test_latest_checkpoint_and_log_parsing(tmp_path):
    for n in (0, 2, 10):
        d = tmp_path / f"epoch_{n}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model-00001-of-00001.safetensors").write_bytes(b"")
        (d / "CHECKPOINT_COMPLETE").write_text("{}")
    (tmp_path / "epoch_11").mkdir()  # incomplete: no weights
    (tmp_path / "epoch_12").mkdir()  # an interrupted save: files, but no completion marker
    (tmp_path / "epoch_12" / "config.json").write_text("{}")
    (tmp_path / "epoch_12" / "model-00001-of-00001.safetensors").write_bytes(b"")
    assert demo.latest_checkpoint(tmp_path).name == "epoch_10"
    with pytest.raises(FileNotFoundError):
        demo.latest_checkpoint(tmp_path / "epoch_11")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "log_1.txt").write_text("Step 2 | loss:1.5 weight_mean:2.0 note:x \nStep 1 | loss:3.0 \nnoise\n")
    assert demo._parse_log(tmp_path) == [{"step": 1.0, "loss": 3.0}, {"step": 2.0, "loss": 1.5, "weight_mean": 2.0}]


def test_cli_rejects_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--no-such-flag"])
    with pytest.raises(SystemExit):
        demo.main(["notakeyvalue"])


def test_tune_command_registers_recipe():
    import subprocess

    cmd = demo.tune_command(["ls"])  # the stock `tune` script, or the registering wrapper without the .pth hook
    assert cmd[-1] == "ls"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "iwsft_distributed" in out and "tiny_cpu" in out


@pytest.mark.slow
def test_demo_one_self_curation_round_end_to_end(tmp_path, capsys):
    out = demo.run_demo(tmp_path / "w", k=2, train_prompts=16, eval_prompts=6, eval_samples=1,
                        methods=("sft", "iwsft"), overrides=("epochs=1", "batch_size=4"), timeout=600)
    text = capsys.readouterr().out
    assert "[iwsft-demo] summary" in text and "p_ref" in text and "(SFT: every weight is 1)" in text
    assert out["curate"]["samples"] == 32 and out["curate"]["correct_samples"] > 0
    for m in ("sft", "iwsft"):
        ckpt = Path(out["results"][m]["checkpoint"])
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen2"
        assert 0.0 <= out["results"][m]["eval"]["greedy_acc"] <= 1.0
    sft_log, iw_log = out["results"]["sft"]["log"], out["results"]["iwsft"]["log"]
    assert sft_log and all("weight_mean" not in r for r in sft_log)
    assert iw_log and all("weight_mean" in r for r in iw_log)
    # step 1: q is p_ref itself and log p_ref is what the sampler recorded (2 processes, through `tune run`)
    assert abs(iw_log[0]["log_ratio_mean"]) < 1e-5
    # identical data order, steps and lr: SFT and iw-SFT see the same batches, so their unweighted NLL agrees at
    # step 1 (same start model) and they train the same number of steps
    assert iw_log[0]["nll"] == pytest.approx(sft_log[0]["nll"], rel=1e-5) and len(iw_log) == len(sft_log)
    # a run directory the demo did not make is never deleted
    (tmp_path / "x" / "runs").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        demo.run_demo(tmp_path / "x", methods=("sft",))
