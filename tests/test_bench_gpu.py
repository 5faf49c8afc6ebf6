"""The pure parts of benchmarks/bench_gpu.py: DiskLogger parsing, parameter count, FLOPs, MFU and the warm-up /
harmonic-mean summary, against hand-computed values (no runs, no timings)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_parse_disk_log_plain_tensor_and_noise():
    text = (
        "Writing logs to somewhere\n"
        "Step 1 | loss:6.25 lr:1e-05 tokens_per_second_per_gpu:1000.5 weight_mean:1.0 \n"
        "\n"
        "Step 2 | loss:tensor(6.0, device='cuda:0') tokens_per_second_per_gpu:tensor(2048., device='cuda:0') "
        "peak_memory_active:12.5 peak_memory_alloc:11 "
        "peak_memory_reserved:20.0 \n"
        "garbage line\n"
    )
    recs = bench.parse_disk_log(text)
    assert recs == [
        {"step": 1, "loss": 6.25, "lr": 1e-05, "tokens_per_second_per_gpu": 1000.5, "weight_mean": 1.0},
        {"step": 2, "loss": 6.0, "tokens_per_second_per_gpu": 2048.0,
         "peak_memory_active": 12.5, "peak_memory_alloc": 11.0, "peak_memory_reserved": 20.0},
    ]


def test_parse_disk_log_keeps_unparsable_values_as_text():
    (rec,) = bench.parse_disk_log("Step 3 | note:hello world epoch:0")
    assert rec == {"step": 3, "note": "hello world", "epoch": 0.0}


def test_count_params_tiny_by_hand():
    # d=64, vocab 512, MLP 128, 2 layers, 4 heads (head_dim 16), 2 kv heads -> kv width 32, tied embeddings.
    # attention: q 64*64+64, k and v 64*32+32 each, o 64*64 = 4160 + 2*2080 + 4096 = 12416
    # MLP 3*64*128 = 24576; norms 2*64 = 128 -> 37120 per layer; + final norm 64 + embedding 512*64 = 32768
    assert bench.count_params(bench.SHAPES["tiny"]) == 2 * 37120 + 64 + 32768 == 107072


def test_count_params_qwen2_5_1_5b():
    # attention 1536^2+1536 + 2*(1536*256+256) + 1536^2 = 5,507,072; MLP 3*1536*8960 = 41,287,680; norms 3072
    # 28 * 46,797,824 + 1536 + 151936*1536 = 1,543,714,304 (Qwen2.5-1.5B's published parameter count)
    assert bench.count_params(bench.SHAPES["1.5b"]) == 1_543_714_304
    untied = dict(bench.SHAPES["1.5b"], tie_word_embeddings=False)
    assert bench.count_params(untied) == 1_543_714_304 + 151936 * 1536


def test_flops_and_mfu_by_hand():
    shape = bench.SHAPES["tiny"]
    assert bench.flops_per_token(1000, shape, seq_len=100) == 6000.0
    # + 12 * layers(2) * d(64) * T(100) = 153,600
    assert bench.flops_per_token(1000, shape, seq_len=100, attention=True) == 6000.0 + 153600.0
    # 10,000 tokens/s * 9e9 FLOP/token = 9e13 FLOP/s on a 1000 TFLOP/s device = 9 %
    assert bench.mfu(10_000, 9e9, peak_tflops=1000) == pytest.approx(0.09)
    # the default peak is the H100 SXM dense bf16 figure
    assert bench.H100_SXM_BF16_DENSE_TFLOPS == 989.0


def _rec(step, tps, mem=None):
    r = {"step": step, "loss": 1.0, "tokens_per_second_per_gpu": float(tps)}
    if mem is not None:
        r.update(peak_memory_active=mem, peak_memory_alloc=mem - 1, peak_memory_reserved=mem + 1)
    return r


def test_summarize_drops_warmup_and_takes_the_harmonic_mean():
    # Steps of 800 label tokens: step 1 (warm-up) 8 s; step 2 4 s (200 tok/s); step 3 2 s (400 tok/s).
    # Measured: 1600 tokens in 6 s = 266.67 tok/s (the arithmetic mean, 300, would be wrong).
    records = [_rec(3, 400, mem=6.0), _rec(1, 100, mem=9.0), _rec(2, 200, mem=5.0)]  # order does not matter
    shape = bench.SHAPES["tiny"]
    s = bench.summarize(records, 1, n_params=1000, shape=shape, input_per_label=1.5, seq_len=100,
                        peak_tflops=1e-6)  # 1e6 FLOP/s
    assert s["steps_logged"] == 3 and s["steps_measured"] == 2
    assert s["label_tokens_per_s_per_gpu"] == pytest.approx(1600 / 6)
    assert s["tokens_per_s_per_gpu"] == pytest.approx(1.5 * 1600 / 6)  # = 400 processed tokens/s
    assert s["mfu"] == pytest.approx(400 * 6000 / 1e6)
    assert s["mfu_with_attention"] == pytest.approx(400 * (6000 + 153600) / 1e6)
    # peak memory: max over the measured steps only (the warm-up step's 9.0 is left out)
    assert (s["peak_memory_active"], s["peak_memory_alloc"], s["peak_memory_reserved"]) == (6.0, 5.0, 7.0)


def test_summarize_without_memory_and_without_steps():
    shape = bench.SHAPES["tiny"]
    s = bench.summarize([_rec(1, 50), _rec(2, 100)], 0, n_params=10, shape=shape, input_per_label=1.0,
                        seq_len=10, peak_tflops=1.0)
    assert s["label_tokens_per_s_per_gpu"] == pytest.approx(2 / (1 / 50 + 1 / 100))
    assert s["peak_memory_active"] is None and s["peak_memory_reserved"] is None
    with pytest.raises(ValueError, match="no step left"):
        bench.summarize([_rec(1, 50)], 1, n_params=10, shape=shape, input_per_label=1.0, seq_len=10,
                        peak_tflops=1.0)
