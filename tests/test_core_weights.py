"""iwsft.weights against naive per-sequence loops and hand-computed values."""

import math
import os
import subprocess
import sys

import pytest
import torch

import iwsft
from iwsft import WeightingConfig


def naive_sequence_weights(lq, lr, mask, temp, lo, hi):
    """One Python loop per sequence, written straight from the paper's formula."""
    out = []
    for b in range(lq.shape[0]):
        diffs = [float(lq[b, t] - lr[b, t]) for t in range(lq.shape[1]) if mask[b, t]]
        mean = sum(diffs) / len(diffs) if diffs else 0.0
        x = temp * mean
        w = math.exp(min(x, 700.0))  # python floats overflow past ~709
        if lo is not None:
            w = max(w, lo)
        if hi is not None:
            w = min(w, hi)
        out.append(w)
    return torch.tensor(out)


def random_batch(B=5, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lq = -torch.rand(B, T, generator=g) * 5
    lr = -torch.rand(B, T, generator=g) * 5
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # an empty response
    mask[2] = True  # a full one
    return lq, lr, mask


def test_hand_computed_values():
    lq = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    lr = torch.tensor([[-1.5, -2.0, -2.5], [-1.0 - math.log(2), -1.0 - math.log(2), 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # row 0: diffs 0.5, 0, -0.5 → mean 0 → w = 1; row 1: mean log 2 → w = 2 (temp 1), 4 (temp 2)
    ratio = iwsft.sequence_log_ratio(lq, lr, mask)
    torch.testing.assert_close(ratio, torch.tensor([0.0, math.log(2)]))
    torch.testing.assert_close(iwsft.sequence_weights(ratio), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(iwsft.sequence_weights(ratio, temperature=2.0), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(iwsft.sequence_weights(ratio, temperature=2.0, clip_max=3.0), torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize("temp,lo,hi", [(1.0, 0.0, 16.0), (10.0, 0.0, 1000.0), (0.5, 0.2, 1.8), (1.0, None, None)])
def test_sequence_weights_match_naive_loop(temp, lo, hi):
    lq, lr, mask = random_batch()
    cfg = WeightingConfig(level="sequence", temperature=temp, clip_min=lo, clip_max=hi)
    w, ratio = iwsft.importance_weights(lq, lr, cfg, mask=mask)
    torch.testing.assert_close(w, naive_sequence_weights(lq, lr, mask, temp, lo, hi), rtol=1e-5, atol=1e-6)
    assert ratio[1] == 0.0  # empty response: log-ratio 0


def test_extreme_log_ratios_never_overflow():
    lq = torch.tensor([[0.0, 0.0], [-5000.0, -5000.0], [0.0, 0.0]])
    lr = torch.tensor([[-5000.0, -5000.0], [0.0, 0.0], [float("-inf"), float("-inf")]])
    mask = torch.tensor([[True, True], [True, True], [False, False]])  # row 2: -inf only at ignored positions
    w, _ = iwsft.importance_weights(lq, lr, WeightingConfig.llm(), mask=mask)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([16.0, 0.0, 1.0]))
    w_lo, _ = iwsft.importance_weights(lq, lr, WeightingConfig.llm(clip_min=0.25), mask=mask)
    torch.testing.assert_close(w_lo, torch.tensor([16.0, 0.25, 1.0]))


def test_packed_and_flat_layouts_equal_padded():
    lq, lr, mask = random_batch(B=4, T=6, seed=3)
    padded, _ = iwsft.importance_weights(lq, lr, WeightingConfig.control(normalize=False), mask=mask)
    # flat (control): concatenate each row's masked steps end to end, describe them with offsets
    lengths = mask.sum(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    seg = iwsft.offsets_to_segment_ids(offsets)
    flat, _ = iwsft.importance_weights(lq[mask], lr[mask], WeightingConfig.control(normalize=False),
                                       segment_ids=seg, num_segments=4)
    torch.testing.assert_close(flat, padded)
    # packed: two sequences per row, with padding (-1) in between
    seg2 = iwsft.segment_ids_from_mask(mask)
    packed_q = lq.reshape(2, 12)
    packed_r = lr.reshape(2, 12)
    packed, _ = iwsft.importance_weights(packed_q, packed_r, WeightingConfig.control(normalize=False),
                                         segment_ids=seg2.reshape(2, 12), num_segments=4)
    torch.testing.assert_close(packed, padded)


def test_offsets_to_segment_ids():
    assert iwsft.offsets_to_segment_ids(torch.tensor([0, 2, 2, 5])).tolist() == [0, 0, 2, 2, 2]
    assert iwsft.offsets_to_segment_ids(torch.tensor([1, 3])).tolist() == [-1, 0, 0]
    with pytest.raises(ValueError, match="non-decreasing"):
        iwsft.offsets_to_segment_ids(torch.tensor([0, 3, 2]))


def test_segment_sum_ignores_nonfinite_padding():
    vals = torch.tensor([1.0, float("nan"), 2.0, float("-inf"), 4.0])
    ids = torch.tensor([0, -1, 1, -1, 0])
    torch.testing.assert_close(iwsft.segment_sum(vals, ids, 3), torch.tensor([5.0, 2.0, 0.0]))


def test_token_weights_match_naive_loop():
    lq, lr, mask = random_batch(seed=1)
    w, ratio = iwsft.importance_weights(lq, lr, WeightingConfig.llm_token(), mask=mask)
    for b in range(lq.shape[0]):
        for t in range(lq.shape[1]):
            expected = min(max(math.exp(float(lq[b, t] - lr[b, t])), 0.2), 1.8) if mask[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(expected, rel=1e-5)
    assert ratio.shape == (lq.shape[0],)


def test_normalize_weights_is_self_normalised_estimate():
    w = torch.tensor([1.0, 3.0, 0.0, 4.0])
    valid = torch.tensor([True, True, False, True])
    wn = iwsft.normalize_weights(w, valid)
    losses = torch.tensor([0.5, 1.5, 9.0, 2.0])
    # Σ w_norm l / n over valid == Σ w l / Σ w (the authors' self-normalised batch estimate)
    lhs = (wn * losses)[valid].sum() / valid.sum()
    rhs = (w * losses)[valid].sum() / w[valid].sum()
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(wn[valid].mean(), torch.tensor(1.0))
    torch.testing.assert_close(iwsft.normalize_weights(torch.zeros(3)), torch.zeros(3))  # all-zero batch unchanged


def test_weight_stats_hand_computed():
    w = torch.tensor([1.0, 1.0, 2.0, 16.0])
    s = iwsft.weight_stats(w, valid=torch.tensor([True, True, True, False]), clip_max=2.0, clip_min=1.0,
                           log_ratio=torch.tensor([0.0, 1.0]))
    assert s["weight_mean"] == pytest.approx(4 / 3)
    assert s["weight_ess"] == pytest.approx(16 / 18)  # (Σw)² / (n Σw²) = 16 / (3 · 6)
    assert s["weight_min"] == 1.0 and s["weight_max"] == 2.0
    assert s["weight_clip_hi"] == pytest.approx(1 / 3)
    assert s["weight_clip_lo"] == pytest.approx(2 / 3)
    assert s["log_ratio_mean"] == pytest.approx(0.5)
    assert iwsft.weight_stats(torch.zeros(2), valid=torch.zeros(2, dtype=torch.bool)) == {}


@pytest.mark.parametrize("kwargs,field", [
    ({"level": "episode"}, "weighting.level"),
    ({"temperature": -1.0}, "weighting.temperature"),
    ({"clip_min": 2.0, "clip_max": 1.0}, "weighting.clip_min"),
    ({"clip_max": 0.0}, "weighting.clip_max"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WeightingConfig(**kwargs)


def test_authors_defaults():
    assert WeightingConfig.llm() == WeightingConfig("sequence", 1.0, 0.0, 16.0, False)
    assert WeightingConfig.control() == WeightingConfig("sequence", 10.0, 0.0, 1000.0, True)
    assert WeightingConfig() == WeightingConfig.llm()


def test_weights_carry_no_gradient():
    lq = torch.randn(2, 3, requires_grad=True)
    w, _ = iwsft.importance_weights(lq, torch.zeros(2, 3), WeightingConfig.llm())
    assert not w.requires_grad


def test_import_does_not_pull_torchtune():
    code = "import sys, iwsft; assert 'torchtune' not in sys.modules, 'iwsft imported torchtune'"
    subprocess.run([sys.executable, "-c", code], check=True)


_DIST_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
import iwsft
rank = int(sys.argv[1]); world = 2
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=world)
w_all = torch.tensor([1.0, 2.0, 3.0, 0.5, 7.0])
valid_all = torch.tensor([True, True, False, True, True])
parts = [slice(0, 2), slice(2, 5)]  # unequal local batches
w = iwsft.normalize_weights(w_all[parts[rank]], valid_all[parts[rank]])
expected = w_all / w_all[valid_all].mean()
torch.testing.assert_close(w, expected[parts[rank]])
print("ok", rank)
dist.destroy_process_group()
"""


def test_normalize_weights_across_ranks(tmp_path):
    script = tmp_path / "norm.py"
    script.write_text(_DIST_SCRIPT)
    init = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(init)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"ok {r}" in out


def test_normalised_weights_survive_underflow():
    """temperature 10 · log-ratio -100 underflows exp() to 0 in fp32; normalisation must still give the right ratios."""
    lq = torch.tensor([[-100.0, -100.0], [-101.0, -101.0], [0.0, 0.0]])
    lr = torch.zeros(3, 2)
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    w, _ = iwsft.importance_weights(lq, lr, WeightingConfig.control(), mask=mask)
    # naive in float64 with the shift written out: w_i ∝ exp(10 · ratio_i) over the two non-empty sequences
    raw = torch.tensor([math.exp(0.0), math.exp(-10.0)], dtype=torch.float64)
    expected = raw / raw.mean()
    torch.testing.assert_close(w[:2].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(w).all()
    # the plain path agrees with the log-space path whenever nothing underflows
    lq2, lr2, mask2 = random_batch(seed=5)
    w_log, _ = iwsft.importance_weights(lq2, lr2, WeightingConfig.control(temperature=1.0), mask=mask2)
    nonempty = mask2.any(1)
    w_raw = iwsft.normalize_weights(naive_sequence_weights(lq2, lr2, mask2, 1.0, 0.0, 1000.0), nonempty)
    torch.testing.assert_close(w_log[nonempty], w_raw[nonempty], rtol=1e-5, atol=1e-6)
    assert (w_log[~nonempty] == 0).all()  # empty sequences carry no loss and get weight 0


def test_token_level_normalised_weights_match_naive():
    lq, lr, mask = random_batch(seed=6)
    w, _ = iwsft.importance_weights(lq, lr, WeightingConfig.llm_token(normalize=True), mask=mask)
    raw = torch.where(mask, (lq - lr).exp().clamp(0.2, 1.8), torch.zeros(()))
    torch.testing.assert_close(w, raw / raw[mask].mean(), rtol=1e-5, atol=1e-6)
