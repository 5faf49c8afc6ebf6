"""Loss paths side by side in one run: torchtune's chunked CE, iw-SFT on chunked logits, iw-SFT fused.

All variants start from the same final hidden states ``[B, T, d]`` and output projection ``[V, d]``, compute the
loss and backpropagate into both (the projection and the log-softmax are part of what is measured):

- ``torchtune``: chunked logits (``[B, T/c, V]`` per chunk, as ``model.set_num_output_chunks(c)`` makes them) →
  ``CEWithChunkedOutputLoss(num_output_chunks=c)`` (a per-token mean)
- ``iwsft``:     the same chunked logits → ``iwsft.token_log_probs`` → ``iwsft.importance_weights`` (sequence
  level, against a random reference) → ``iwsft.weighted_nll`` → ``loss_sum / num_tokens``
- ``fused``:     ``iwsft.fused_token_log_probs`` (projection + log-softmax ``--fused-chunk`` label tokens at a time,
  recomputed in backward; the ``[N, V]`` logits never exist) → the same weighting and loss
- ``fused_cce``  (``--device cuda`` only, when ``cut-cross-entropy`` is installed): the same with
  ``fused_backend="cce"``.

Time: median of ``--repeats`` forward+backward passes, variants alternating in one process; on CPU both wall time
and process CPU time (one thread; the ratios use CPU time, which other jobs on a shared machine disturb far less).
Memory (CPU): each variant runs once more in a fresh interpreter (``--measure``) and reports
(1) the peak of torch's tensor allocations during the pass, from ``torch.profiler`` (``profile_memory=True``):
the CPU allocator reports every allocation and free with its running "Total Allocated", counted from the start of
the pass (inputs already built), so transients inside the pass are included; and (2) the peak RSS growth
(Linux: the peak RSS ``VmHWM`` is reset through ``/proc/self/clear_refs`` just before the pass; peak minus RSS
before), which also sees memory outside torch's allocator (BLAS buffers) and allocator/page effects.
Memory (CUDA): ``torch.cuda.max_memory_allocated`` during the pass minus the allocation before it.
The script also checks that the three losses and gradient checksums agree (fp32: ≤ 1e-5 relative).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_loss.py --batch 1 --seq 4096 --vocab 152064 --dim 896
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --seq 22000 --vocab 152064 --dim 5120   # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import iwsft

VARIANTS = ("torchtune", "iwsft", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    hidden = (torch.randn(args.batch, args.seq, args.dim, generator=g) * 0.5).to(dev, dt)
    weight = (torch.randn(args.vocab, args.dim, generator=g) * args.dim ** -0.5).to(dev, dt)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels[:, : int(args.seq * args.prompt_frac)] = -100  # prompt tokens are not trained on
    logp_ref = -torch.rand(args.batch, args.seq, generator=g) * 8
    return hidden, weight, labels.to(dev), logp_ref.to(dev)


def _leaves(hidden, weight):
    return hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)


def _checksums(result):
    """(loss, |grad h|_1, |grad W|_1) in float64, computed after the measured pass (it allocates copies)."""
    h, w, loss = result
    return [float(loss.detach()), float(h.grad.double().abs().sum()), float(w.grad.double().abs().sum())]


def _iw_loss(token_logp, labels, logp_ref):
    mask = labels != -100
    weights, _ = iwsft.importance_weights(token_logp.detach(), logp_ref, iwsft.WeightingConfig.llm(), mask=mask)
    loss_sum, num_tokens = iwsft.weighted_nll(token_logp, mask, seq_weights=weights)
    return loss_sum / num_tokens


def run_torchtune(inputs, args, tt_loss):
    hidden, weight, labels, _ = inputs
    h, w = _leaves(hidden, weight)
    logits = [c @ w.T for c in h.chunk(args.chunks, dim=1)]
    loss = tt_loss(logits, labels)
    del logits
    loss.backward()
    return h, w, loss.detach()


def run_iwsft(inputs, args, tt_loss):
    hidden, weight, labels, logp_ref = inputs
    h, w = _leaves(hidden, weight)
    logits = [c @ w.T for c in h.chunk(args.chunks, dim=1)]
    token_logp = iwsft.token_log_probs(logits, labels)
    del logits
    loss = _iw_loss(token_logp, labels, logp_ref)
    loss.backward()
    return h, w, loss.detach()


def run_fused(inputs, args, tt_loss, backend="torch"):
    hidden, weight, labels, logp_ref = inputs
    h, w = _leaves(hidden, weight)
    token_logp = iwsft.fused_token_log_probs(h, w, labels, chunk_size=args.fused_chunk, backend=backend)
    loss = _iw_loss(token_logp, labels, logp_ref)
    loss.backward()
    return h, w, loss.detach()


def run_fused_cce(inputs, args, tt_loss):
    return run_fused(inputs, args, tt_loss, backend="cce")


RUNNERS = {"torchtune": run_torchtune, "iwsft": run_iwsft, "fused": run_fused, "fused_cce": run_fused_cce}


def _sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tensor_peak_from_profiler(prof) -> int:
    """Peak of the CPU allocator's running total during the profiled region (bytes, from its start)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
              and "Total Allocated" in e.get("args", {})]
    return max(totals) if totals else 0


def measure_memory_here(args, variant, tt_loss) -> dict:
    """One pass of ``variant`` in this process: peak tensor bytes and peak RSS growth (CPU) or CUDA peak."""
    inputs = make_inputs(args)
    fn = RUNNERS[variant]
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(inputs, args, tt_loss)
        torch.cuda.synchronize()
        return {"tensor_peak": torch.cuda.max_memory_allocated() - base, "rss_growth": None}
    from torch.profiler import ProfilerActivity, profile

    _reset_peak_rss()
    before = _status_kib("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(inputs, args, tt_loss)
    rss = (_status_kib("VmHWM") - before) * 1024
    return {"tensor_peak": _tensor_peak_from_profiler(prof), "rss_growth": rss}


def _arg_list(args):
    out = []
    for k in ("batch", "seq", "vocab", "dim", "chunks", "fused_chunk", "prompt_frac", "device", "dtype"):
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


def measure_memory(args, variant, tt_loss) -> dict:
    """CPU: a fresh interpreter per variant (earlier passes cannot hide this one's peak RSS)."""
    if args.device == "cuda":
        return measure_memory_here(args, variant, tt_loss)
    cmd = [sys.executable, __file__, "--measure", variant, *_arg_list(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--dim", type=int, default=896)
    ap.add_argument("--chunks", type=int, default=8, help="torchtune output chunks (chunked paths)")
    ap.add_argument("--fused-chunk", type=int, default=iwsft.fused.DEFAULT_CHUNK_SIZE,
                    help="label tokens per chunk of the fused path")
    ap.add_argument("--prompt-frac", type=float, default=0.25, help="leading fraction of each row with label -100")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--variants", default=None, help="comma list (default: all that run on the device)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--measure", choices=list(RUNNERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    tt_loss = CEWithChunkedOutputLoss(num_output_chunks=args.chunks)
    if args.measure:
        print(json.dumps(measure_memory_here(args, args.measure, tt_loss)))
        return
    variants = list(VARIANTS)
    if args.device == "cuda":
        try:
            import cut_cross_entropy  # noqa: F401

            variants.append("fused_cce")
        except ImportError:
            print("cut-cross-entropy not installed: fused_cce skipped")
    if args.variants:
        variants = [v for v in args.variants.split(",") if v]
    torch.manual_seed(0)
    inputs = make_inputs(args)

    times = {k: [] for k in variants}
    cpu_times = {k: [] for k in variants}
    sums = {}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for name in order:
            _sync(args)
            t0, c0 = time.perf_counter(), time.process_time()
            result = RUNNERS[name](inputs, args, tt_loss)
            _sync(args)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            sums[name] = _checksums(result)
            del result
    del inputs
    mem = {name: measure_memory(args, name, tt_loss) for name in variants}

    # The losses and gradient checksums of the iw-SFT variants agree (same weights), and with unit weights the
    # iw-SFT loss is torchtune's CE; here the weights come from a random reference, so compare iwsft vs fused.
    tol = 1e-5 if args.dtype == "fp32" else 2e-2
    agree = {}
    for name in variants:
        if name in ("iwsft", "torchtune") or "iwsft" not in sums:
            continue
        rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(sums[name], sums["iwsft"]))
        agree[name] = rel
        assert rel <= tol, f"{name} disagrees with iwsft: rel {rel:.2e} (loss, |grad h|, |grad W|)"

    med = {k: statistics.median(v) for k, v in times.items()}
    # CPU: process CPU time (one thread) is what the targets use; wall time moves with other jobs on the machine.
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    tmed = med if args.device == "cuda" else cpu_med
    n_label = int(args.batch * (args.seq - int(args.seq * args.prompt_frac)))
    head = (f"B={args.batch} T={args.seq} (label tokens {n_label}) V={args.vocab} d={args.dim} "
            f"{args.dtype} {args.device} chunks={args.chunks} fused_chunk={args.fused_chunk} "
            f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(head)
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"{'variant':<12}{'fwd+bwd wall s':>16}{'fwd+bwd CPU s':>15}{'peak tensors MiB':>18}"
          f"{'peak RSS growth MiB':>21}")
    for k in variants:
        rss = mem[k]["rss_growth"]
        print(f"{k:<12}{med[k]:>16.2f}{cpu_med[k]:>15.2f}{mem[k]['tensor_peak'] / 2 ** 20:>18.1f}"
              f"{(rss / 2 ** 20 if rss is not None else float('nan')):>21.1f}")
    base = "torchtune"
    ratios = {}
    if base in variants:
        for k in variants:
            if k == base:
                continue
            ratios[k] = {"time": tmed[k] / tmed[base], "wall_time": med[k] / med[base],
                         "tensor_peak": mem[k]["tensor_peak"] / max(mem[base]["tensor_peak"], 1)}
            if mem[k]["rss_growth"] is not None:
                ratios[k]["rss_growth"] = mem[k]["rss_growth"] / max(mem[base]["rss_growth"], 1)
            extra = f", RSS growth {ratios[k]['rss_growth']:.3f}x" if "rss_growth" in ratios[k] else ""
            print(f"ratio {k}/torchtune: time ({'wall' if args.device == 'cuda' else 'CPU'}) "
                  f"{ratios[k]['time']:.3f}x (wall {ratios[k]['wall_time']:.3f}x), peak tensors "
                  f"{ratios[k]['tensor_peak']:.3f}x{extra}")
    print("agreement with iwsft (max rel. diff of loss, |grad h|_1, |grad W|_1): "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "header": head, "times_s": times, "median_s": med, "cpu_times_s": cpu_times, "cpu_median_s": cpu_med, "memory": mem,
                       "ratios": ratios, "agreement": agree, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
