"""``loss.reduction: sequence | token`` against independent computations.

``sequence`` is the authors' effective objective (REFERENCE §1): each sequence's weighted NLL sum divided by its own
label-token count, then the mean over the global batch, ``−mean_b[w_b · mean_t log π(y_bt)]``. ``token`` is
torchtune's global token mean. The oracles are naive loops written here: per sequence over a plain tensor batch,
and a transformers forward of the tiny model for the recipe's first step.

Also multi-node, shown on one machine: two torchrun "nodes" (one process each) meet through a c10d rendezvous on
127.0.0.1 and must train exactly like the single-node 2-process run of ``sequence_runs`` (same loss curve, same
final weights).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_recipe import (CONFIGS, RECIPE, load_weights, losses, path_overrides, read_metrics, run_env,  # noqa: F401
                         run_recipe, tiny_assets)

import iwsft

COMMON = ["shuffle=false", "epochs=1", "max_steps_per_epoch=2", "clip_grad_norm=null"]


# ------------------------------------------------------------------------------------------ unit level
def _batch(seed=0, b=5, t=11):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 5
    mask = torch.rand(b, t, generator=g) > 0.4
    mask[3] = False  # a row with no label token: adds nothing and is not counted
    mask[0, :2] = True
    w = torch.rand(b, generator=g) * 3
    tw = torch.rand(b, t, generator=g) + 0.5
    return logp, mask, w, tw


def _naive_sequence(logp, mask, w, tw):
    per_seq = []
    for b in range(logp.shape[0]):
        n = int(mask[b].sum())
        if n == 0:
            continue
        total = 0.0
        for t in range(logp.shape[1]):
            if mask[b, t]:
                total += -float(w[b]) * float(tw[b, t]) * float(logp[b, t])
        per_seq.append(total / n)
    return sum(per_seq), len(per_seq)


def test_sequence_reduction_equals_a_naive_per_sequence_loop():
    logp, mask, w, tw = _batch()
    num, den = iwsft.weighted_nll(logp, mask, seq_weights=w, token_weights=tw, reduction="sequence")
    ref_num, ref_den = _naive_sequence(logp, mask, w, tw)
    assert int(den) == ref_den == 4
    assert float(num) == pytest.approx(ref_num, rel=1e-6)
    tnum, tden = iwsft.weighted_nll(logp, mask, seq_weights=w, token_weights=tw, reduction="token")
    naive_tok = sum(-float(w[b]) * float(tw[b, t]) * float(logp[b, t]) for b in range(5) for t in range(11)
                    if mask[b, t])
    assert int(tden) == int(mask.sum()) and float(tnum) == pytest.approx(naive_tok, rel=1e-6)
    assert float(num) / int(den) != pytest.approx(float(tnum) / int(tden), rel=1e-3)  # they really differ


def test_sequence_reduction_is_exact_when_the_batch_is_split_or_packed():
    logp, mask, w, tw = _batch(seed=1)
    full = iwsft.weighted_nll(logp, mask, seq_weights=w, token_weights=tw, reduction="sequence")
    parts = [iwsft.weighted_nll(logp[i:i + 2], mask[i:i + 2], seq_weights=w[i:i + 2], token_weights=tw[i:i + 2],
                                reduction="sequence") for i in range(0, 5, 2)]  # micro-batches / ranks
    assert float(sum(p[0] for p in parts)) / int(sum(p[1] for p in parts)) == pytest.approx(
        float(full[0]) / int(full[1]), rel=1e-6)
    # packing: all five rows laid end to end in one row, sequence k = segment k; weights expanded per token
    seg = torch.arange(5).unsqueeze(1).expand(5, 11).reshape(1, -1)
    packed = iwsft.weighted_nll(logp.reshape(1, -1), mask.reshape(1, -1),
                                token_weights=(tw * w.unsqueeze(1)).reshape(1, -1), reduction="sequence",
                                segment_ids=seg, num_segments=5)
    assert int(packed[1]) == int(full[1]) and float(packed[0]) == pytest.approx(float(full[0]), rel=1e-6)
    with pytest.raises(ValueError, match="loss.reduction"):
        iwsft.weighted_nll(logp, mask, reduction="mean")


# ------------------------------------------------------------------------------------------ the recipe
def naive_first_step(assets, n_rows: int):
    """Per-sequence (sum, count) of the NLL of rows 0..n-1 under the starting model, with transformers."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from transformers import AutoModelForCausalLM

    from iwsft.tune.datasets import s1k_dataset

    ckpt = Path(assets["checkpoint_dir"])
    tok = qwen2_5_tokenizer(path=str(ckpt / "vocab.json"), merges_file=str(ckpt / "merges.txt"),
                            special_tokens_path=str(ckpt / "tokenizer.json"), max_seq_len=512)
    ds = s1k_dataset(tok, source="json", data_files=assets["data"])
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32)
    out = []
    for i in range(n_rows):
        ids = torch.tensor(ds[i]["tokens"]).unsqueeze(0)
        target = torch.tensor(ds[i]["labels"])[1:]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        keep = target != -100
        out.append((-logp[keep].gather(1, target[keep].unsqueeze(1)).sum().item(), int(keep.sum())))
    return out


@pytest.fixture(scope="session")
def sequence_runs(tiny_assets, tmp_path_factory):  # noqa: F811
    """iw-SFT with reduction=sequence, global batch 4: one process × batch 4, and 2 processes × batch 1 × 2
    accumulation steps (also the single-node baseline of the multi-node test)."""
    tmp = tmp_path_factory.mktemp("reduction")
    one = run_recipe(tiny_assets, tmp / "one", "loss.reduction=sequence", "batch_size=4", *COMMON)
    two = run_recipe(tiny_assets, tmp / "two", "loss.reduction=sequence", "batch_size=1",
                     "gradient_accumulation_steps=2", *COMMON, nproc=2)
    return tmp / "one", one, tmp / "two", two


@pytest.mark.slow
def test_sequence_reduction_in_the_recipe_matches_a_naive_loop_and_is_exact_under_accumulation(
        sequence_runs, tiny_assets):  # noqa: F811
    one_dir, one, two_dir, two = sequence_runs
    per_seq = naive_first_step(tiny_assets, 4)  # shuffle=false: step 1 is rows 0..3 in both runs
    seq_mean = sum(s / n for s, n in per_seq) / 4
    tok_mean = sum(s for s, _ in per_seq) / sum(n for _, n in per_seq)
    assert one[0]["weight_mean"] == pytest.approx(1.0, abs=1e-5)  # q = p_ref at step 1: the loss is the NLL
    # fp32 both sides: they agree to ~1e-7 here. The random model's per-token NLL is nearly log(vocab) on every
    # sequence, so the two reductions differ by only ~9e-5 (relative) on this batch: tolerances sit well between.
    assert one[0]["loss"] == pytest.approx(seq_mean, rel=2e-6)
    assert one[0]["loss"] != pytest.approx(tok_mean, rel=2e-5)
    assert one[0]["nll"] == pytest.approx(tok_mean, rel=2e-6)  # `nll` stays the token mean (comparable with SFT)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert two[1]["weight_mean"] != pytest.approx(1.0)  # step 2 is really importance-weighted
    a, b = load_weights(one_dir / "epoch_0"), load_weights(two_dir / "epoch_0")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5)


def test_token_reduction_in_the_recipe_matches_a_naive_loop(tiny_assets, tmp_path):  # noqa: F811
    rows = run_recipe(tiny_assets, tmp_path / "run", "loss.reduction=token", "batch_size=4", "shuffle=false",
                      "epochs=1", "max_steps_per_epoch=1")
    per_seq = naive_first_step(tiny_assets, 4)
    tok_mean = sum(s for s, _ in per_seq) / sum(n for _, n in per_seq)
    assert rows[0]["loss"] == pytest.approx(tok_mean, rel=2e-6)
    assert rows[0]["loss"] != pytest.approx(sum(s / n for s, n in per_seq) / 4, rel=2e-5)


# ------------------------------------------------------------------------------------------ multi-node
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_exactly_like_one_node_with_two_processes(sequence_runs, tiny_assets, tmp_path):  # noqa: F811
    _, _, two_dir, two = sequence_runs
    out = tmp_path / "run"
    port = free_port()
    overrides = [*path_overrides(tiny_assets, out), "loss.reduction=sequence", "batch_size=1",
                 "gradient_accumulation_steps=2", *COMMON]
    nodes = []
    for node_rank in (0, 1):  # what `tune run --nnodes 2 --nproc_per_node 1 --rdzv_endpoint ...` starts per node
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=iwsft_multinode_test", str(RECIPE), "--config", str(CONFIGS / "tiny_cpu.yaml"), *overrides]
        nodes.append(subprocess.Popen(cmd, cwd=str(tmp_path), env=run_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-5000:]
    assert "2 process(es)" in "".join(logs)  # one world of two ranks, not two single-process runs
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in two] == [1, 2]
    assert losses(rows) == pytest.approx(losses(two), rel=1e-6)
    assert losses(rows, "weight_mean") == pytest.approx(losses(two, "weight_mean"), rel=1e-6)
    a, b = load_weights(two_dir / "epoch_0"), load_weights(out / "epoch_0")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_the_configs_that_reproduce_the_paper_use_the_sequence_reduction():
    from omegaconf import OmegaConf

    for name in ("qwen_32b", "qwen_32b_lora", "qwen_7b", "qwen_7b_lora", "qwen_1_5b", "qwen_1_5b_lora"):
        path = CONFIGS / f"{name}.yaml"
        assert OmegaConf.load(path).loss.reduction == "sequence", name
        if name.startswith("qwen_32b"):  # the headers say so
            assert "Loss reduction `sequence`" in path.read_text().split("\n\n")[0], name
    assert OmegaConf.load(CONFIGS / "tiny_cpu.yaml").loss.reduction == "token"
