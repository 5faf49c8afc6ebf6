"""iwsft.quality, iwsft.ema and iwsft.reference against hand-computed values and numpy."""

import os
import random

import numpy as np
import pytest

import torch
from torch import nn

import iwsft
from iwsft.reference import StaleCacheError


# ---------------------------------------------------------------- quality
def test_percentile_levels_match_numpy():
    scores = np.random.default_rng(0).normal(size=200)
    levels = iwsft.percentile_levels(scores)
    t90, t95, t98 = np.percentile(scores, [90, 95, 98])
    expected = (scores >= t90).astype(int) + (scores >= t95) + (scores >= t98)
    assert levels.tolist() == expected.tolist()
    assert levels.max() == 3 and (levels == 0).sum() == 180  # 20 episodes at or above the 90th percentile


def test_level_sampling_probs_hand_computed():
    probs = iwsft.level_sampling_probs([0, 1, 2, 3, 0])
    assert probs.tolist() == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 0])
    with pytest.raises(ValueError, match="every level is 0"):
        iwsft.level_sampling_probs([0, 0])


def test_top_fraction_mask():
    assert iwsft.top_fraction_mask([5.0, 1.0, 9.0, 3.0, 7.0], 0.4).tolist() == [False, False, True, False, True]
    assert iwsft.top_fraction_mask([1.0, 1.0, 1.0], 0.34).tolist() == [True, False, False]  # ties: by position
    with pytest.raises(ValueError, match="selects none"):
        iwsft.top_fraction_mask([1.0, 2.0, 3.0], 0.1)
    with pytest.raises(ValueError, match="fraction"):
        iwsft.top_fraction_mask([1.0], 0.0)


def test_quality_weights_and_errors():
    assert iwsft.quality_weights([1.0, 3.0]).tolist() == pytest.approx([0.5, 1.5])
    assert iwsft.quality_weights([1.0, 3.0], normalize=False).tolist() == pytest.approx([1.0, 3.0])
    with pytest.raises(ValueError, match=r"quality\[1\]"):
        iwsft.quality_weights([1.0, -2.0])
    with pytest.raises(ValueError, match=r"scores\[2\]"):
        iwsft.percentile_levels([1.0, 2.0, float("nan")])


def test_quality_sampler_ranks_split_one_global_draw():
    weights = [5.0, 3.0, 2.0, 0.0]
    single = list(iwsft.QualitySampler(weights, num_samples=12, seed=7))
    ranks = [list(iwsft.QualitySampler(weights, num_replicas=2, rank=r, num_samples=12, seed=7)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]  # disjoint positions of the same draw


def test_quality_sampler_frequencies_epochs_and_errors():
    sampler = iwsft.QualitySampler([5.0, 3.0, 2.0, 0.0], num_samples=20000, seed=0)
    draws = np.array(list(sampler))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.015)  # 3 sigma of a binomial at n=20000 is < 0.011
    assert freq[3] == 0.0  # zero quality is never drawn
    first = list(sampler)
    assert list(sampler) == first  # same epoch: reproducible (resume)
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="positive sum"):
        iwsft.QualitySampler([0.0, 0.0])
    with pytest.raises(ValueError, match="split"):
        iwsft.QualitySampler([1.0], num_replicas=2)


# ---------------------------------------------------------------- EMA
def test_ema_hand_computed():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = iwsft.EMA(net, decay=0.9)
    for target in (1.0, 1.0):
        with torch.no_grad():
            net.weight.fill_(target)
        ema.update(net)
    # 0 → 0.9·0 + 0.1·1 = 0.1 → 0.9·0.1 + 0.1·1 = 0.19
    assert ema.module.weight.item() == pytest.approx(0.19)
    assert not ema.module.weight.requires_grad
    assert net.weight.item() == 1.0  # the tracked module is untouched
    with pytest.raises(ValueError, match="decay"):
        iwsft.EMA(net, decay=1.5)


# ---------------------------------------------------------------- reference cache
def _batch():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, -5.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    return torch.tensor([7, 3]), logp, mask


def test_reference_roundtrip_gather_and_sums(tmp_path):
    ids, logp, mask = _batch()
    cache = iwsft.ReferenceLogProbs(key={"data": "x"})
    cache.add(ids, logp, mask)
    assert len(cache) == 2 and 7 in cache and 5 not in cache
    # the same samples in another order and another padding layout
    mask2 = torch.tensor([[False, False, True, True, False], [False, False, False, True, True]])
    out = cache.gather(torch.tensor([3, 7]), mask2)
    assert out.tolist() == [[0, 0, -4, -5, 0], [0, 0, 0, -2, -3]]
    sums, counts = cache.sequence_sums(torch.tensor([7, 3]))
    assert sums.tolist() == [-5.0, -9.0] and counts.tolist() == [2, 2]

    path = tmp_path / "sub" / "ref.pt"
    cache.save(path)
    assert os.listdir(path.parent) == ["ref.pt"]  # no temp files left behind
    loaded = iwsft.ReferenceLogProbs.load(path, key={"data": "x"})
    torch.testing.assert_close(loaded.gather(ids, mask), cache.gather(ids, mask))
    with pytest.raises(StaleCacheError, match="stale"):
        iwsft.ReferenceLogProbs.load(path, key={"data": "y"})


def test_a_damaged_cache_is_never_reported_as_stale(tmp_path):
    """Garbage bytes can make torch.load raise a ValueError subclass (here UnicodeDecodeError: these 4,096 bytes,
    found by search, do so in torch 2.13); the recipe must still call such a file damaged, not stale."""
    path = tmp_path / "ref.pt"
    path.write_bytes(random.Random(195).randbytes(4096))
    with pytest.raises(Exception) as e:
        iwsft.ReferenceLogProbs.load(path, key={"data": "x"})
    assert not isinstance(e.value, StaleCacheError)
    if not isinstance(e.value, ValueError):
        pytest.skip(f"this torch raises {type(e.value).__name__} here, not a ValueError: nothing to tell apart")


def test_reference_errors_and_merge():
    ids, logp, mask = _batch()
    a = iwsft.ReferenceLogProbs()
    a.add(ids[:1], logp[:1], mask[:1])
    b = iwsft.ReferenceLogProbs()
    b.add(ids[1:], logp[1:], mask[1:])
    with pytest.raises(KeyError, match="sample_id 3"):
        a.gather(ids, mask)
    merged = iwsft.ReferenceLogProbs().merge([a, b])
    assert merged.ids() == [3, 7]
    with pytest.raises(ValueError, match="label tokens"):
        merged.gather(torch.tensor([7]), torch.ones(1, 4, dtype=torch.bool))


def test_fingerprint_is_stable_and_sensitive():
    assert iwsft.fingerprint({"a": 1, "b": [1, 2]}) == iwsft.fingerprint({"b": [1, 2], "a": 1})
    assert iwsft.fingerprint({"a": 1}) != iwsft.fingerprint({"a": 2})
