"""The fused output projection + log-prob path (iwsft.fused) against independent oracles.

Oracles: ``log_softmax(h @ W.T)`` gathered at the labels, written here; the existing chunked-logits path
(``iwsft.token_log_probs`` on torchtune's chunked output) on the same tiny torchtune Qwen2 model, compared for every
parameter's gradient; an unsharded single-process model for the FSDP2 runs; the recipe's own unfused runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import iwsft
from iwsft import fused_token_log_probs

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # the exactness bar (fp32)


def oracle_logp(h, w, labels, ignore_index=-100):
    """Plain dense log-softmax of the full logits, gathered at the labels, 0 where ignored."""
    logp = torch.log_softmax((h @ w.T).float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == ignore_index, torch.zeros_like(picked), picked)


def make(B=3, T=13, d=24, V=97, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g) * 2).to(dtype)
    w = (torch.randn(V, d, generator=g) * d ** -0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100  # prompt
    labels[1, 9:] = -100  # padding
    labels[2, :] = -100  # a row with no label token
    return h, w, labels


def close(a, b, rtol=RTOL):
    """Relative to the largest magnitude of the reference (elementwise relative error is meaningless near 0)."""
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"max abs err {err:.3e} > {rtol} x {scale:.3e}"


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_values_and_gradients_equal_dense_log_softmax(chunk_size):
    h, w, labels = make()
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))  # arbitrary dL/dlogp
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_token_log_probs(h1, w1, labels, chunk_size=chunk_size)
    (out * upstream).sum().backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = oracle_logp(h2, w2, labels)
    (ref * upstream).sum().backward()
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert (out[labels == -100] == 0).all()
    close(out, ref)
    close(h1.grad, h2.grad)
    close(w1.grad, w2.grad)
    assert (h1.grad[labels == -100] == 0).all()  # ignored positions get no gradient


def test_loss_and_gradients_equal_the_chunked_path_with_importance_weights():
    h, w, labels = make(seed=2)
    mask = labels != -100
    seq_w = torch.tensor([2.0, 0.5, 3.0])

    def run(fused):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if fused:
            logp = fused_token_log_probs(hh, ww, labels, chunk_size=5)
        else:
            logp = iwsft.token_log_probs([c @ ww.T for c in hh.chunk(4, dim=1)], labels)
        loss_sum, n = iwsft.weighted_nll(logp, mask, seq_weights=seq_w)
        (loss_sum / n).backward()
        return logp.detach(), loss_sum.detach(), hh.grad, ww.grad

    for a, b in zip(run(True), run(False)):
        close(a, b)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_works():
    h, w, labels = make(seed=3)
    hh = h.clone().requires_grad_(True)
    fused_token_log_probs(hh, w, labels).sum().backward()  # w does not require grad (LoRA base, frozen copy)
    assert w.grad is None and hh.grad is not None
    with torch.no_grad():
        close(fused_token_log_probs(h, w, labels), oracle_logp(h, w, labels))


def test_bf16_inputs_give_fp32_log_probs_close_to_the_chunked_path():
    h, w, labels = make(seed=4, dtype=torch.bfloat16)
    out = fused_token_log_probs(h, w, labels, chunk_size=7)
    ref = iwsft.token_log_probs(h @ w.T, labels)  # bf16 logits upcast to fp32, as the model's chunked output
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # bf16 matmul blocking may differ


def test_saves_no_vocabulary_sized_tensor_for_backward():
    """What autograd keeps between forward and backward: O(N) values plus h and W, never anything [N, V]."""
    B, T, d, V = 3, 64, 8, 1000
    h, w, labels = make(B=B, T=T, d=d, V=V, seed=5)

    def saved_numels(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h.clone().requires_grad_(True), w.clone().requires_grad_(True))
        return sizes

    fused = saved_numels(lambda hh, ww: fused_token_log_probs(hh, ww, labels, chunk_size=16))
    chunked = saved_numels(lambda hh, ww: iwsft.token_log_probs([c @ ww.T for c in hh.chunk(4, 1)], labels))
    assert max(fused) <= max(B * T * d, V * d) and sum(fused) < B * T * d + V * d + 4 * B * T
    assert sum(chunked) >= B * T * V  # the chunked path keeps (at least) the full fp32 log-softmax


def test_bad_inputs_raise_clear_errors():
    h, w, labels = make()
    bad = labels.clone()
    bad[0, 7] = 97
    with pytest.raises(ValueError, match=r"outside \[0, 97\)"):
        fused_token_log_probs(h, w, bad)
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        fused_token_log_probs(h[:, :4], w, labels)
    with pytest.raises(ValueError, match="fused_chunk_size"):
        fused_token_log_probs(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="fused_backend"):
        fused_token_log_probs(h, w, labels, backend="liger")
    with pytest.raises((ImportError, ValueError), match="cce"):  # optional CUDA kernel: never silently on CPU
        fused_token_log_probs(h, w, labels, backend="cce")
    with pytest.raises(ValueError, match="fused_backend"):
        iwsft.ChunkedWeightedNLL(fused=True, fused_backend="nope")


# ------------------------------------------------------------------------------------- tiny torchtune model
def tiny_model(tied=True, lora=False, seed=0):
    from torchtune.models.qwen2 import lora_qwen2, qwen2
    from iwsft.tiny import tiny_qwen2_kwargs

    kw = dict(tiny_qwen2_kwargs(max_seq_len=256), tie_word_embeddings=tied)
    torch.manual_seed(seed)
    if not lora:
        return qwen2(**kw)
    model = lora_qwen2(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4,
                       lora_alpha=8, **kw)
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    with torch.no_grad():  # non-zero adapters, so that disabling them changes the log-probs
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    set_trainable_params(model, get_adapter_params(model))
    return model


def batch(B=3, T=40, V=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :6] = -100
    labels[2, 30:] = -100
    return tokens, labels


def step_grads(model, tokens, labels, fused, seq_w):
    """One weighted backward; returns the log-probs and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    if fused:
        model.set_num_output_chunks(0)
        logp = model._head.log_probs(tokens, labels)
    else:
        model.set_num_output_chunks(3)
        logp = iwsft.token_log_probs(model(tokens), labels)
    loss_sum, n = iwsft.weighted_nll(logp, labels != -100, seq_weights=seq_w)
    (loss_sum / n).backward()
    return logp.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tied,lora,ac", [(True, False, False), (False, False, True), (True, True, True)],
                         ids=["full-tied", "full-untied-actckpt", "lora-tied-actckpt"])
def test_every_parameter_gradient_equals_the_chunked_path_on_the_tiny_model(tied, lora, ac):
    from torchtune import modules, training

    model = tiny_model(tied=tied, lora=lora)
    if ac:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    keys = list(model.state_dict())
    model._head = iwsft.FusedOutputHead(model, chunk_size=17)
    assert list(model.state_dict()) == keys  # checkpoints are untouched by the head
    tokens, labels = batch()
    seq_w = torch.tensor([1.5, 0.7, 2.0])
    logp_c, grads_c = step_grads(model, tokens, labels, False, seq_w)
    logp_f, grads_f = step_grads(model, tokens, labels, True, seq_w)
    close(logp_f, logp_c)
    assert grads_c.keys() == grads_f.keys() and len(grads_c) > 0
    for k in grads_c:
        close(grads_f[k], grads_c[k])
    model.set_num_output_chunks(0)  # outside log_probs the model still returns logits
    assert model(tokens).shape == (3, 40, 512)
    if lora:  # the adapters_off reference pass goes through the fused head too
        from torchtune.modules.peft import disable_adapter

        with torch.no_grad(), disable_adapter(model):
            off_f = model._head.log_probs(tokens, labels)
            off_c = iwsft.token_log_probs(model(tokens), labels)
        close(off_f, off_c)
        assert (off_f - logp_f).abs().max() > 1e-4  # the adapters really were off


def test_head_refuses_what_it_cannot_fuse_exactly():
    from torchtune.models.qwen2 import lora_qwen2
    from iwsft.tiny import tiny_qwen2_kwargs

    m = lora_qwen2(lora_attn_modules=["q_proj"], apply_lora_to_output=True, lora_rank=2, lora_alpha=4,
                   **dict(tiny_qwen2_kwargs(max_seq_len=64), tie_word_embeddings=False))
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        iwsft.FusedOutputHead(m)
    m2 = tiny_model()
    head = iwsft.FusedOutputHead(m2)
    m2.set_num_output_chunks(4)  # the output module would see a quarter of the sequence
    tokens, labels = batch()
    with pytest.raises(ValueError, match="set_num_output_chunks"):
        head.log_probs(tokens, labels)


# ------------------------------------------------------------------------------------------------ FSDP2
FSDP_SCRIPT = textwrap.dedent('''
    import json, sys
    from functools import partial
    import torch, torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg
    from torchtune import training
    sys.path.insert(0, sys.argv[2])
    from test_fused_loss import tiny_model, batch, step_grads
    import iwsft

    dist.init_process_group("gloo")
    gathers = []
    real = pg.foreach_all_gather
    def counting(fsdp_params, *a, **k):  # every real all-gather of an FSDP unit: the shapes it gathers
        gathers.append(sorted(tuple(fp._orig_size) for fp in fsdp_params))
        return real(fsdp_params, *a, **k)
    pg.foreach_all_gather = counting
    result = {}
    for tied, names in ((True, None), (False, ["output"])):
        tokens, labels = batch(seed=1)  # the same batch on both ranks: the averaged gradient is the local one
        seq_w = torch.tensor([1.2, 0.4, 2.5])
        ref = tiny_model(tied=tied)
        logp_ref, grads_ref = step_grads(ref, tokens, labels, False, seq_w)
        counts = {}
        for fused in (False, True):
            model = tiny_model(tied=tied)
            training.shard_model(model, [partial(training.get_shard_conditions, names_to_match=names)],
                                 cpu_offload=False, reshard_after_forward=True)
            model._head = iwsft.FusedOutputHead(model, chunk_size=9)
            gathers.clear()
            logp, grads = step_grads(model, tokens, labels, fused, seq_w)
            counts[fused] = sum(g == [(512, 64)] for g in gathers)  # all-gathers of the output unit alone
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in grads.items()}
        err = max(((full[k] - grads_ref[k]).abs().max() / grads_ref[k].abs().max().clamp_min(1e-12)).item()
                  for k in grads_ref)
        logp_err = ((logp - logp_ref).abs().max() / logp_ref.abs().max()).item()
        result[f"tied={tied}"] = {"logp_rel_err": logp_err, "grad_rel_err": err,
                                  "n_params": len(full), "output_gathers_chunked": counts[False],
                                  "output_gathers_fused": counts[True]}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
''')


def test_fsdp2_two_processes_equal_gradients_and_one_gather_per_forward(tmp_path):
    import os

    script = tmp_path / "fsdp_fused.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(out), str(Path(__file__).parent)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    for case in res.values():
        assert case["logp_rel_err"] < RTOL and case["grad_rel_err"] < RTOL, case
        assert case["n_params"] > 10
    # output sharded as its own FSDP unit: the fused head gathers it once in forward and once in backward
    # (reshard_after_forward=True), where the chunked path gathers it once per chunk in forward.
    untied = res["tied=False"]
    assert untied["output_gathers_fused"] == 2, untied
    assert untied["output_gathers_chunked"] > untied["output_gathers_fused"], untied


# ------------------------------------------------------------------------------------------------ recipe
@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from iwsft.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets_fused") / "tiny")


def _recipe_rows(assets, out, *overrides, config="tiny_cpu", nproc=2):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_recipe import run_recipe

    return run_recipe(assets, out, "epochs=1", "max_steps_per_epoch=3", *overrides, config=config, nproc=nproc)


@pytest.mark.slow
@pytest.mark.parametrize("config,extra", [("tiny_cpu", ["reference.strategy=model"]),
                                          ("tiny_cpu_lora", [])], ids=["full-model-ref", "lora-adapters-off"])
def test_recipe_two_processes_fused_equals_chunked(tiny_assets, tmp_path, config, extra):
    from test_recipe import load_weights

    a = _recipe_rows(tiny_assets, tmp_path / "chunked", *extra, config=config)
    b = _recipe_rows(tiny_assets, tmp_path / "fused", "loss.fused=true", "loss.fused_chunk_size=64", *extra,
                     config=config)
    assert len(a) == len(b) == 3
    for key in ("loss", "nll", "weight_mean", "weight_max", "log_ratio_mean", "grad_norm"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-7), key
    assert b[-1]["weight_mean"] != pytest.approx(1.0)  # really importance-weighted
    wa, wb = load_weights(tmp_path / "chunked" / "epoch_0"), load_weights(tmp_path / "fused" / "epoch_0")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5)  # after 3 AdamW steps


@pytest.mark.slow
def test_recipe_one_process_fused_precomputed_and_ema(tiny_assets, tmp_path):
    """1 process: the reference precompute pass and the EMA q forward use the fused head too."""
    a = _recipe_rows(tiny_assets, tmp_path / "chunked", "weighting.q=ema", "weighting.ema_decay=0.5", nproc=1)
    b = _recipe_rows(tiny_assets, tmp_path / "fused", "weighting.q=ema", "weighting.ema_decay=0.5",
                     "loss.fused=true", nproc=1)
    for key in ("loss", "nll", "weight_mean", "log_ratio_mean"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-7), key
