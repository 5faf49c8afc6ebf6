"""torchtune's chunked cross-entropy vs iw-SFT's weighted NLL, side by side in one process (CPU).

Both paths start from the same hidden states and output projection, produce torchtune-style chunked logits
(``[B, T/c, V]`` per chunk, as ``model.set_num_output_chunks(c)`` does), compute the loss and backpropagate:

- ``torchtune``: ``CEWithChunkedOutputLoss(num_output_chunks=c)(chunks, labels)`` (a per-token mean)
- ``iwsft``:     ``iwsft.token_log_probs(chunks, labels)`` → ``iwsft.importance_weights`` (sequence level, with a
                 random reference) → ``iwsft.weighted_nll`` → ``loss_sum / num_tokens``

Time: median of ``--repeats`` forward+backward passes (the two variants alternate, same process). Peak memory:
one pass per variant in a fresh interpreter (the script re-runs itself with ``--measure``), peak RSS during the pass
minus RSS before it (``getrusage`` max RSS; Linux). torch's CPU allocator has no peak counter and
``torch.profiler``'s memory events net out transients inside ops, so RSS is the honest CPU measure.

    OMP_NUM_THREADS=1 python benchmarks/bench_loss.py [--batch 2 --seq 1024 --vocab 16384 --dim 256 --chunks 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import iwsft


def make_inputs(batch, seq, vocab, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=g) * 0.5
    weight = torch.randn(vocab, dim, generator=g) * dim ** -0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 4] = -100  # prompt tokens are not trained on
    logp_ref = -torch.rand(batch, seq, generator=g) * 8
    return hidden, weight, labels, logp_ref


def chunked_logits(hidden, weight, chunks):
    return [h @ weight.T for h in hidden.chunk(chunks, dim=1)]


def run_torchtune(hidden, weight, labels, logp_ref, chunks, loss_fn):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    logits = chunked_logits(h, w, chunks)
    loss = loss_fn(logits, labels)
    del logits
    loss.backward()
    return loss.detach()


def run_iwsft(hidden, weight, labels, logp_ref, chunks, loss_fn):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    logits = chunked_logits(h, w, chunks)
    token_logp = iwsft.token_log_probs(logits, labels)
    del logits
    mask = labels != -100
    weights, _ = iwsft.importance_weights(token_logp.detach(), logp_ref, iwsft.WeightingConfig.llm(), mask=mask)
    loss_sum, num_tokens = iwsft.weighted_nll(token_logp, mask, seq_weights=weights)
    loss = loss_sum / num_tokens
    loss.backward()
    return loss.detach()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure_peak_in_this_process(args, variant) -> int:
    """Peak RSS growth of one pass (Linux): max RSS after the pass minus RSS before it, inputs already built."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    inputs = make_inputs(args.batch, args.seq, args.vocab, args.dim)
    fn = {"torchtune": run_torchtune, "iwsft": run_iwsft}[variant]
    before = _rss_bytes()
    fn(*inputs, args.chunks, CEWithChunkedOutputLoss(num_output_chunks=args.chunks))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def peak_alloc_bytes(args, variant) -> int:
    """Runs one pass in a fresh interpreter (so earlier passes cannot hide this one's peak) and returns its peak."""
    cmd = [sys.executable, __file__, "--measure", variant, "--batch", str(args.batch), "--seq", str(args.seq),
           "--vocab", str(args.vocab), "--dim", str(args.dim), "--chunks", str(args.chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--measure", choices=["torchtune", "iwsft"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(_measure_peak_in_this_process(args, args.measure))
        return
    torch.manual_seed(0)
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    tt_loss = CEWithChunkedOutputLoss(num_output_chunks=args.chunks)
    inputs = make_inputs(args.batch, args.seq, args.vocab, args.dim)
    variants = {"torchtune": run_torchtune, "iwsft": run_iwsft}

    # Same value when all weights are 1 (sanity): identical reference → weights exactly 1.
    h, w, lab, _ = inputs
    ref_logp = iwsft.token_log_probs(chunked_logits(h, w, args.chunks), lab).detach()
    a = run_torchtune(h, w, lab, ref_logp, args.chunks, tt_loss)
    b = run_iwsft(h, w, lab, ref_logp, args.chunks, tt_loss)
    assert torch.allclose(a, b, rtol=1e-5), (a, b)

    times = {k: [] for k in variants}
    for _ in range(2):  # warm-up
        for name, fn in variants.items():
            fn(*inputs, args.chunks, tt_loss)
    for r in range(args.repeats):
        order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]
        for name, fn in order:
            t0 = time.perf_counter()
            fn(*inputs, args.chunks, tt_loss)
            times[name].append(time.perf_counter() - t0)
    mem = {name: peak_alloc_bytes(args, name) for name in variants}

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"B={args.batch} T={args.seq} V={args.vocab} d={args.dim} chunks={args.chunks} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"{'variant':<12}{'fwd+bwd ms (median)':>22}{'peak RSS growth MiB':>22}")
    for k in variants:
        print(f"{k:<12}{med[k] * 1e3:>22.1f}{mem[k] / 2 ** 20:>22.1f}")
    print(f"ratio iwsft/torchtune: time {med['iwsft'] / med['torchtune']:.3f}x, "
          f"peak memory {mem['iwsft'] / mem['torchtune']:.3f}x (targets <= 1.05x)")


if __name__ == "__main__":
    main()
