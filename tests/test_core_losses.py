"""iwsft.losses against torchtune's chunked cross-entropy and naive weighted NLL."""

import pytest
import torch
import torch.nn.functional as F

import iwsft
from iwsft import WeightingConfig


def make_batch(B=3, T=10, V=17, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, 7:] = -100  # padding
    labels[2, :] = -100  # fully masked row
    return logits, labels


def naive_token_logp(logits, labels):
    out = torch.zeros(labels.shape)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != -100:
                out[b, t] = torch.log_softmax(logits[b, t].float(), -1)[labels[b, t]]
    return out


def test_token_log_probs_chunked_equals_naive():
    logits, labels = make_batch()
    full = iwsft.token_log_probs(logits, labels)
    chunked = iwsft.token_log_probs(list(logits.chunk(4, dim=1)), labels)
    torch.testing.assert_close(full, naive_token_logp(logits.detach(), labels))
    torch.testing.assert_close(chunked, full)
    assert full.dtype == torch.float32 and (full[labels == -100] == 0).all()


def test_token_log_probs_rejects_misaligned_chunks():
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="positions"):
        iwsft.token_log_probs([logits[:, :4]], labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_weights_equal_torchtune_chunked_ce(dtype):
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    logits, labels = make_batch(dtype=dtype, seed=1)
    chunks = list(logits.chunk(5, dim=1))
    ref = CEWithChunkedOutputLoss(num_output_chunks=5)(chunks, labels)
    ref.backward()
    ref_grad = logits.grad.clone()
    logits.grad = None
    loss_sum, n = iwsft.weighted_nll(iwsft.token_log_probs(chunks, labels), labels != -100,
                                     seq_weights=torch.ones(3))
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert n == (labels != -100).sum()


def test_weighted_loss_and_gradient_equal_naive():
    logits, labels = make_batch(seed=2)
    seq_w = torch.tensor([2.0, 0.5, 3.0])
    tok_w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    mask = labels != -100
    loss_sum, n = iwsft.weighted_nll(iwsft.token_log_probs(list(logits.chunk(3, dim=1)), labels), mask,
                                     seq_weights=seq_w, token_weights=tok_w)
    loss_sum.backward()
    grad = logits.grad.clone()

    logits2 = logits.detach().clone().requires_grad_(True)
    naive = 0.0
    for b in range(3):
        for t in range(labels.shape[1]):
            if mask[b, t]:
                naive = naive - seq_w[b] * tok_w[b, t] * torch.log_softmax(logits2[b, t], -1)[labels[b, t]]
    naive.backward()
    torch.testing.assert_close(loss_sum, naive)
    torch.testing.assert_close(grad, logits2.grad)


def test_iwsft_step_with_q_current_model():
    """Weights from the detached log-probs of the same forward act as constants in the gradient."""
    logits, labels = make_batch(seed=3)
    mask = labels != -100
    logp = iwsft.token_log_probs(logits, labels)
    ref_logp = logp.detach() - 0.1 * torch.arange(3).unsqueeze(1) * mask  # q/p_ref ratio e^{0}, e^{0.1}, e^{0.2}
    w, _ = iwsft.importance_weights(logp, ref_logp, WeightingConfig.llm(), mask=mask)
    torch.testing.assert_close(w[:2], torch.tensor([0.0, 0.1]).exp())
    loss_sum, n = iwsft.weighted_nll(logp, mask, seq_weights=w)
    loss_sum.backward()
    # the same loss with w as a plain constant tensor gives the same gradient
    logits2 = logits.detach().clone().requires_grad_(True)
    const_w = w.clone()
    l2 = -(const_w[:, None] * iwsft.token_log_probs(logits2, labels) * mask).sum()
    l2.backward()
    torch.testing.assert_close(logits.grad, logits2.grad)


def test_weights_requiring_grad_are_detached():
    logits, labels = make_batch(seed=4)
    w = torch.ones(3, requires_grad=True)
    loss_sum, _ = iwsft.weighted_nll(iwsft.token_log_probs(logits, labels), labels != -100, seq_weights=w)
    loss_sum.backward()
    assert w.grad is None


def test_seq_weight_shape_error():
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="seq_weights"):
        iwsft.weighted_nll(iwsft.token_log_probs(logits, labels), labels != -100, seq_weights=torch.ones(2))


def test_module_wrapper():
    logits, labels = make_batch(seed=5)
    loss_fn = iwsft.ChunkedWeightedNLL(num_output_chunks=2)
    s, n = loss_fn(loss_fn.token_log_probs(list(logits.chunk(2, 1)), labels), labels != -100)
    torch.testing.assert_close(s / n, F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1)))
    with pytest.raises(ValueError, match="num_output_chunks"):
        iwsft.ChunkedWeightedNLL(num_output_chunks=0)
