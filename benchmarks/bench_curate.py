"""Sampling throughput of ``python -m iwsft.curate`` on CPU (transformers backend, KV cache, batched).

Samples ``k`` answers per prompt from the shipped tiny ``p_ref`` (``iwsft/assets/pref_addition``) on held-out
addition prompts at temperature 1, for several prompts-per-batch settings (batch = prompts × k sequences), one
thread, and prints samples/s and generated tokens/s (wall time of ``curate`` minus model loading, best of
``--repeats``). Also checks the KV cache is on by timing ``use_cache=False`` once for the largest batch.

    OMP_NUM_THREADS=1 python benchmarks/bench_curate.py [--prompts 64 --k 8 --batches 1,4,16 --repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from iwsft.curate import HFSampler, SamplingConfig, curate, load_prompts
    from iwsft.selfimprove import ASSET_DIR, write_prompts

    tmp = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    try:
        write_prompts(tmp / "p.jsonl", a.prompts, seed=99)
        prompts = load_prompts(tmp / "p.jsonl")
        sampler = HFSampler(ASSET_DIR)
        print(f"torch {torch.__version__}, 1 thread, {a.prompts} prompts x k={a.k}, temperature 1, "
              f"max_new_tokens 48, model {ASSET_DIR.name}")
        print("| prompts per batch | sequences per batch | samples/s | generated tokens/s | mean tokens/sample |")
        print("|---:|---:|---:|---:|---:|")
        for bp in [int(x) for x in a.batches.split(",")]:
            best = None
            for r in range(a.repeats):
                cfg = SamplingConfig(k=a.k, temperature=1.0, max_new_tokens=48, batch_prompts=bp, seed=r)
                s = curate(ASSET_DIR, prompts, tmp / f"o{bp}_{r}", cfg, verifier="aime", sampler=sampler,
                           progress=False, quiet=True)
                if best is None or s["samples_per_second"] > best["samples_per_second"]:
                    best = s
            print(f"| {bp} | {bp * a.k} | {best['samples_per_second']:.1f} | "
                  f"{best['generated_tokens_per_second']:.0f} | {best['mean_response_tokens']:.1f} |")
        # the KV cache matters: the same largest batch without it
        import transformers  # noqa: F401

        orig = sampler.model.generate

        def no_cache(*args, generation_config=None, **kw):
            generation_config.use_cache = False
            return orig(*args, generation_config=generation_config, **kw)

        sampler.model.generate = no_cache
        bp = max(int(x) for x in a.batches.split(","))
        cfg = SamplingConfig(k=a.k, temperature=1.0, max_new_tokens=48, batch_prompts=bp, seed=0)
        s = curate(ASSET_DIR, prompts, tmp / "nocache", cfg, verifier="aime", sampler=sampler, progress=False,
                   quiet=True)
        print(f"| {bp} (use_cache=False) | {bp * a.k} | {s['samples_per_second']:.1f} | "
              f"{s['generated_tokens_per_second']:.0f} | {s['mean_response_tokens']:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
