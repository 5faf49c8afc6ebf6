"""The README's first command: the offline CPU demo (tiny assets, 2-process iw-SFT, transformers load + generate)."""

import json

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
def test_demo_end_to_end(tmp_path, capsys):
    out = demo.run_demo(tmp_path / "w", num_rows=32, overrides=("epochs=2", "max_steps_per_epoch=4"),
                        max_new_tokens=8, timeout=600)
    text = capsys.readouterr().out
    assert "[iwsft-demo] summary" in text and "weight_mean" in text
    ckpt = tmp_path / "w" / "run" / "epoch_1"
    assert out["checkpoint"] == str(ckpt) and (ckpt / "config.json").is_file()
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen2"
    steps = [int(r["step"]) for r in out["log"]]
    assert steps == list(range(1, 9))  # 2 epochs x 4 steps, one log row each
    assert all("loss" in r and "weight_mean" in r for r in out["log"])
    # the model actually trained: the saved checkpoint fits the training answers better than the start model
    assert out["nll_after"] < out["nll_before"] - 0.1
    assert isinstance(out["generation"], str) and out["generation"]
    # a second run with other data settings rebuilds the assets and replaces its own run directory
    again = demo.run_demo(tmp_path / "w", num_rows=16, overrides=("epochs=1", "max_steps_per_epoch=1"),
                          max_new_tokens=2, timeout=600)
    assert again["checkpoint"].endswith("epoch_0") and not ckpt.exists()
    with open(again["assets"]["data"]) as f:
        assert len(f.read().splitlines()) == 16
