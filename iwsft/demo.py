"""The main job: one round of self-curation on CPU, fully offline: ``iwsft-demo`` (or ``python -m iwsft.demo``).

The setting in which iw-SFT is exact — the model curates its *own* verified samples, so ``p_ref`` is known token by
token — on the embedded tiny setup:

1. ``p_ref``: the tiny Qwen2-architecture model shipped in ``iwsft/assets/pref_addition`` (0.5 MB; trained through
   the recipe on a noisy two-strategy teacher for two-digit addition: ``python -m iwsft.selfimprove pretrain
   --install`` rebuilds it). Its held-out accuracy (greedy and sampled at temperature 1) is measured first.
2. curate: ``k`` samples per training prompt at temperature 1 with :mod:`iwsft.curate` (KV cache, batched),
   verified with the checker of ``evals/`` (``score_aime``: integer answers), recording each sampled token's
   ``log p_ref``.
3. fine-tune from ``p_ref`` on the verified samples with the stock CLI, once per method, identical data order,
   steps and learning rate::

       tune run --nproc_per_node 2 iwsft_distributed --config selfcurate_tiny checkpoint_dir=<p_ref> \
           dataset.data_files=<workdir>/curated/samples.jsonl output_dir=<workdir>/runs/<method> [method=sft]

   methods: ``sft``; ``iwsft`` (the authors' settings: sequence weights, temperature 1, clip 16);
   ``iwsft_t20`` (weighting temperature 20) — with ``reference.strategy: dataset`` (the recorded ``log p_ref``).
4. evaluate every model on held-out prompts with the same checker and print the comparison and the
   importance-weight statistics from the training logs.

Everything goes to ``<workdir>`` (default ``outputs/demo``; ``<workdir>/runs`` is replaced on every run, only if
an earlier demo created it). Extra ``key=value`` arguments are passed to every ``tune run`` as config overrides.
Measured: 295.7 s (about 5 minutes) on 2 cores shared with other jobs (2026-11-30); an unloaded run was not
timed. One round with one seed is a demonstration, not evidence: the
study with paired seeds is ``python -m iwsft.selfimprove`` (README, "Self-curation").
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

RUN_MARKER = ".iwsft_demo_run"
DEMO_METHODS = ("sft", "iwsft", "iwsft_t20")

# Registers the recipe with torchtune's registry in-process, then hands over to the stock CLI. Used only when the
# project's site-packages hook (iwsft_tune_registry.pth) is not installed, e.g. when running from a source tree.
_TUNE_WRAPPER = (
    "import sys, torchtune._recipe_registry as r; from iwsft.tune.registry import register; register(r); "
    "from torchtune._cli.tune import main; sys.argv[0] = 'tune'; main()"
)


def _hook_installed() -> bool:
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    return any(glob.glob(os.path.join(d, "*iwsft*registry*.pth")) for d in dirs if d)


def tune_command(args: Sequence[str]) -> List[str]:
    """The argv that runs ``tune <args>`` with ``iwsft_distributed`` registered.

    The stock ``tune`` script next to this interpreter when the registry hook is installed, else an equivalent
    ``python -c`` wrapper that registers the recipe first.
    """
    tune = Path(sys.executable).with_name("tune")
    if tune.is_file() and _hook_installed():
        return [str(tune), *args]
    return [sys.executable, "-c", _TUNE_WRAPPER, *args]


def latest_checkpoint(output_dir) -> Path:
    """The ``epoch_N`` directory with the largest N under ``output_dir`` that holds an HF model whose save finished
    (the recipe writes ``epoch_N/CHECKPOINT_COMPLETE`` after all of the epoch's files)."""
    found = []
    for d in Path(output_dir).glob("epoch_*"):
        m = re.fullmatch(r"epoch_(\d+)", d.name)
        if m and (d / "CHECKPOINT_COMPLETE").is_file() and (d / "config.json").is_file() and \
                list(d.glob("*.safetensors")):
            found.append((int(m.group(1)), d))
    if not found:
        raise FileNotFoundError(f"no complete epoch_N/ HF checkpoint under {output_dir}")
    return max(found)[1]


def _parse_log(output_dir) -> List[Dict[str, float]]:
    """Rows of the DiskLogger files (``Step N | key:value ...``) under ``output_dir``, in step order."""
    rows = []
    for path in sorted(Path(output_dir).rglob("log_*.txt")):
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line.strip())
            if not m:
                continue
            row: Dict[str, float] = {"step": float(m.group(1))}
            for kv in m.group(2).split():
                k, _, v = kv.partition(":")
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def run_demo(
    workdir="outputs/demo",
    *,
    nproc: int = 2,
    k: int = 4,
    train_prompts: int = 128,
    eval_prompts: int = 100,
    eval_samples: int = 2,
    methods: Sequence[str] = DEMO_METHODS,
    overrides: Sequence[str] = (),
    seed: int = 0,
    pref: Optional[str] = None,
    timeout: float = 900.0,
) -> Dict[str, Any]:
    """Runs one self-curation round (see the module docstring) and returns a summary dict.

    Returns: ``pref`` (model dir), ``pref_eval``, ``curate`` (the curation summary), ``results`` (per method:
    ``checkpoint``, ``train_seconds``, ``log`` (parsed metric rows), ``weights`` (mean of the logged weight
    statistics over steps), ``eval`` (``greedy_acc``, ``sampled_acc``, strategy shares)), ``seconds``.
    Raises ``RuntimeError`` (with the log path) when a training run fails.
    """
    from iwsft.curate import SamplingConfig, curate, load_prompts
    from iwsft.selfimprove import ASSET_DIR, METHODS, P_ONES, evaluate, weight_log_stats, write_prompts

    t0 = time.monotonic()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pref_dir = Path(pref).resolve() if pref else ASSET_DIR
    if not (pref_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"no p_ref model in {pref_dir}: rebuild it with python -m iwsft.selfimprove "
                                "pretrain --install")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {list(METHODS)}")
    runs = workdir / "runs"
    if runs.exists():
        if not (runs / RUN_MARKER).is_file():
            raise FileExistsError(f"{runs} exists and was not made by iwsft.demo; remove it or pick --workdir")
        shutil.rmtree(runs)
    runs.mkdir()
    (runs / RUN_MARKER).write_text("created by python -m iwsft.demo; replaced on the next run\n")
    for d in ("curated",):
        shutil.rmtree(workdir / d, ignore_errors=True)

    held = write_prompts(workdir / "prompts" / "heldout.jsonl", eval_prompts, seed=424242)
    write_prompts(workdir / "prompts" / "train.jsonl", train_prompts, seed=17 + seed,
                  exclude=[r["question"] for r in held])
    print(f"[iwsft-demo] p_ref: {pref_dir}", flush=True)
    pref_eval = evaluate(pref_dir, workdir / "prompts" / "heldout.jsonl", samples=eval_samples, seed=1000 + seed)
    print(f"[iwsft-demo] p_ref held-out accuracy: greedy {pref_eval['greedy_acc']:.3f}, sampled "
          f"{pref_eval.get('sampled_acc', float('nan')):.3f}", flush=True)

    print(f"[iwsft-demo] curating {k} samples per prompt for {train_prompts} training prompts (temperature 1)",
          flush=True)
    cfg = SamplingConfig(k=k, temperature=1.0, max_new_tokens=48, batch_prompts=16, seed=seed)
    cur = curate(pref_dir, load_prompts(workdir / "prompts" / "train.jsonl"), workdir / "curated", cfg,
                 verifier="aime", progress=False)
    samples = workdir / "curated" / "samples.jsonl"

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the processes share the machine's cores
    env["PYTHONUNBUFFERED"] = "1"
    results: Dict[str, Any] = {}
    for m in methods:
        out = runs / m
        tune_args = ["run", "--nproc_per_node", str(nproc), "iwsft_distributed", "--config", "selfcurate_tiny",
                     f"checkpoint_dir={pref_dir}", f"dataset.data_files={samples}", f"output_dir={out}",
                     f"seed={seed}", *METHODS[m], *overrides]
        print(f"[iwsft-demo] training {m}: tune " + " ".join(tune_args), flush=True)
        t1 = time.monotonic()
        log_path = runs / f"{m}.log"
        rc = _run_quiet(tune_command(tune_args), log_path, env, timeout)
        if rc != 0:
            raise RuntimeError(f"training {m} failed (exit code {rc}); full output in {log_path}")
        train_s = time.monotonic() - t1
        ckpt = latest_checkpoint(out)
        ev = evaluate(ckpt, workdir / "prompts" / "heldout.jsonl", samples=eval_samples, seed=1000 + seed)
        results[m] = {"checkpoint": str(ckpt), "train_seconds": train_s, "log": _parse_log(out),
                      "weights": weight_log_stats(out), "eval": ev}
        print(f"[iwsft-demo]   {m}: {train_s:.0f} s, greedy {ev['greedy_acc']:.3f}, sampled "
              f"{ev.get('sampled_acc', float('nan')):.3f}", flush=True)

    print("\n[iwsft-demo] summary (one round, one seed: a demonstration, not a significance test)")
    print(f"  curated: {cur['samples']} samples, accuracy {cur['accuracy']:.3f}, {cur['correct_samples']} verified "
          f"rows trained on, pass@{k} {cur[f'pass@{k}']:.3f}; {cur['samples_per_second'] or 0:.1f} samples/s")
    print(f"  {'model':<10} {'greedy':>7} {'sampled':>8} {'ones%':>6}   weights: mean    std     min     max    "
          f"ESS   clip_hi  log_ratio")
    rows = [("p_ref", pref_eval, None)] + [(m, r["eval"], r["weights"]) for m, r in results.items()]
    for name, ev, w in rows:
        line = (f"  {name:<10} {ev['greedy_acc']:>7.3f} {ev.get('sampled_acc', float('nan')):>8.3f} "
                f"{100 * ev.get('share_ones', float('nan')):>6.1f}")
        if w and "weight_mean" in w:
            line += (f"   {w['weight_mean']:>13.4f} {w['weight_std']:>7.4f} {w['weight_min']:>7.3f} "
                     f"{w['weight_max']:>7.3f} {w['weight_ess']:>6.3f} {w.get('weight_clip_hi', 0):>6.3f} "
                     f"{w.get('log_ratio_mean', float('nan')):>10.5f}")
        elif w is not None:
            line += "   (SFT: every weight is 1)"
        print(line)
    print(f"  ones% = share of sampled solutions using the less accurate column strategy (p_ref's teacher used it "
          f"{100 * P_ONES:.0f}% of the time).\n  Weights: means over training steps of the recipe's logged "
          "statistics. At weighting temperature 1 they stay within a few % of 1 on these short answers (the log-ratio "
          "is averaged over ~40 tokens),\n  so iwsft is close to SFT here; iwsft_t20 multiplies that mean log-ratio by "
          "20 before exp, which spreads the weights.")
    total = time.monotonic() - t0
    print(f"  total {total:.1f} s", flush=True)
    return {"pref": str(pref_dir), "pref_eval": pref_eval, "curate": cur, "results": results, "seconds": total}


def _run_quiet(cmd: List[str], log_path: Path, env: Dict[str, str], timeout: float) -> int:
    """Runs ``cmd`` with its output in ``log_path`` (kills its whole process group after ``timeout`` s)."""
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                      start_new_session=True) as proc:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # torchrun's workers live in the session we created
            proc.wait()
            raise RuntimeError(f"training did not finish within {timeout:.0f} s; see {log_path}") from None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iwsft-demo", description="Offline CPU demo: one self-curation round (p_ref, curate, SFT vs iw-SFT, "
                                       "held-out accuracy) on the tiny shipped model.",
        epilog="Extra key=value arguments are passed to every `tune run` as config overrides (e.g. epochs=1).")
    parser.add_argument("--workdir", default="outputs/demo", help="scratch directory (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="samples per training prompt")
    parser.add_argument("--train-prompts", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=2, help="sampled answers per held-out prompt")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS),
                        help="comma-separated, from sft, iwsft, iwsft_t20, iwsft_token, placebo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pref", default=None, help="another p_ref model dir (default: the shipped one)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per training run")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    run_demo(args.workdir, nproc=args.nproc, k=args.k, train_prompts=args.train_prompts,
             eval_prompts=args.eval_prompts, eval_samples=args.eval_samples,
             methods=[m for m in args.methods.split(",") if m], overrides=extra, seed=args.seed, pref=args.pref,
             timeout=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
