"""A CPU-scale self-improvement study: SFT vs iw-SFT on the model's own verified samples, exact ``p_ref``.

``python -m iwsft.selfimprove --out runs/selfimprove [--seeds 5] [--rounds 2] [--jobs 2]``

The task is verifiable two-digit addition ("What is 47 + 38?") answered in the s1 format
(``<|im_start|>think ... <|im_start|>answer Answer: 85``). ``p_ref`` is the tiny Qwen2-architecture model of
:mod:`iwsft.tiny` trained *through the recipe* (``method=sft``) on the worked solutions of a deliberately noisy
teacher that uses two strategies:

- ``ones``/column addition — ``ones 7+8=15 carry 1 / tens 4+3+1=8 / so 85`` — which forgets the carry in
  :data:`FORGET_CARRY` of the problems that need one, and
- ``split`` addition — ``split 47+30=77 / 77+8=85 / so 85`` — which slips by ±1 in :data:`SPLIT_SLIP` of them,

picking ``ones`` with probability :data:`P_ONES` (so it is the more frequent, but less accurate, strategy).
Every worked step may also slip (:data:`SLIP`). The model's own sampled accuracy then sits in the 30–60% range and
its samples use both strategies: a small version of the two-armed bandit (``tests/test_bandit.py``), where SFT on
the verified samples moves towards the success-weighted mixture and iw-SFT further towards the better arm.

Each round (``--rounds``), for every seed (``--seeds``, paired: all methods of a seed start from the same model,
see the same curated rows in the same order, with the same steps and learning rate):

1. curate ``k`` samples per training prompt from the current model at temperature 1 with
   ``python -m iwsft.curate``'s code (exact per-token ``log p_ref``), verified with ``evals.scoring.score_aime``;
2. fine-tune with the recipe (``configs/selfcurate_tiny.yaml``, ``reference.strategy: dataset``) under each
   method: ``sft``; ``iwsft`` (sequence weights, temperature 1, clip 16: the authors'); ``iwsft_t20``
   (weighting temperature :data:`HOT` = 20); ``iwsft_token`` (per-token weights, clip [0.2, 1.8]); ``placebo``
   (the ``iwsft_t20`` weights shuffled within each micro-batch: same weight distribution, no information);
3. evaluate every resulting model on held-out prompts with the same checker: greedy accuracy and sampled accuracy
   (``--eval-samples`` per prompt at temperature 1).

The next round starts each method from its own model of the previous round (expert iteration) — except that every
method's round-``r`` data come from *its own* model, so methods diverge from round 2 on.

Outputs under ``--out``: ``pref/`` (the trained ``p_ref``), ``seed<S>/round<R>/{curated,<method>}/`` (each step
skipped when its ``DONE.json`` exists: the study is resumable), ``results.jsonl`` (one row per seed × round ×
method), ``table.md`` (mean and 95% interval of every paired difference vs SFT), ``accuracy.png`` (held-out
accuracy per round per method with 95% intervals) and ``weights.png`` (importance-weight statistics from the
training logs). The default ``--config full`` is the configuration the README's table was produced with (``table.md`` names
the configuration). ``--help`` lists the sizes and measured times of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "pref_addition"

P_ONES = 0.65  # the teacher picks the column strategy this often
FORGET_CARRY = 0.8  # ... and then forgets the carry in this share of the problems that have one
SPLIT_SLIP = 0.15  # the split strategy's final step is off by one this often
SLIP = 0.05  # any worked step may slip by one (both strategies)
HOT = 20.0  # the larger weighting temperature of the sweep (length-averaged log-ratios are small)

METHODS: Dict[str, List[str]] = {
    "sft": ["method=sft"],
    "iwsft": ["method=iwsft", "weighting.level=sequence", "weighting.temperature=1.0", "weighting.clip_min=0.0",
              "weighting.clip_max=16.0"],
    "iwsft_t20": ["method=iwsft", "weighting.level=sequence", f"weighting.temperature={HOT}",
                 "weighting.clip_min=0.0", "weighting.clip_max=16.0"],
    "iwsft_token": ["method=iwsft", "weighting.level=token", "weighting.temperature=1.0", "weighting.clip_min=0.2",
                    "weighting.clip_max=1.8"],
    "placebo": ["method=iwsft", "weighting.level=sequence", f"weighting.temperature={HOT}",
                "weighting.clip_min=0.0", "weighting.clip_max=16.0",
                "loss._component_=iwsft.selfimprove.ShuffledChunkedWeightedNLL"],
}


# ----------------------------------------------------------------------------------------------------------------
# the task and the noisy teacher


def problem(rng: random.Random) -> Dict[str, Any]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"a": a, "b": b, "question": f"What is {a} + {b}?", "answer": str(a + b)}


def _slip(rng: random.Random, v: int, p: float) -> int:
    return v + rng.choice([-1, 1]) if rng.random() < p else v


def teacher_solution(p: Dict[str, Any], rng: random.Random) -> Dict[str, Any]:
    """One noisy worked solution: ``thinking``, ``attempt``, ``strategy`` and whether it is ``correct``."""
    a, b = p["a"], p["b"]
    if rng.random() < P_ONES:
        strategy = "ones"
        ones = _slip(rng, a % 10 + b % 10, SLIP)
        carry = 1 if ones >= 10 else 0
        use_carry = carry and rng.random() >= FORGET_CARRY
        tens = _slip(rng, a // 10 + b // 10 + (1 if use_carry else 0), SLIP)
        result = tens * 10 + ones % 10
        thinking = (f"ones {a % 10}+{b % 10}={ones}" + (" carry 1" if carry else "") + "\n"
                    + f"tens {a // 10}+{b // 10}" + ("+1" if use_carry else "") + f"={tens}\nso {result}")
    else:
        strategy = "split"
        first = _slip(rng, a + (b // 10) * 10, SLIP)
        result = _slip(rng, first + b % 10, SPLIT_SLIP)
        thinking = f"split {a}+{(b // 10) * 10}={first}\n{first}+{b % 10}={result}\nso {result}"
    return {"thinking": thinking, "attempt": f"Answer: {result}", "strategy": strategy,
            "correct": result == a + b}


def strategy_of(text: str) -> str:
    """``ones`` / ``split`` / ``other``: the first word of the thinking part of a sampled solution."""
    body = text.split("<|im_start|>think\n", 1)[-1].lstrip()
    for s in ("ones", "split"):
        if body.startswith(s):
            return s
    return "other"


def write_prompts(path: Path, n: int, seed: int, exclude: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """``n`` distinct problems (none of ``exclude``) as a JSONL prompt file (``question``, ``answer``)."""
    rng, seen, rows = random.Random(seed), set(exclude), []
    while len(rows) < n:
        p = problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        rows.append({"question": p["question"], "answer": p["answer"]})
    _write_if_changed(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write (temp file + rename), skipped when the file already holds ``text``: processes running other
    seeds of the same study may be reading it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_teacher_data(path: Path, n: int, seed: int, exclude: Sequence[str] = ()) -> Dict[str, float]:
    """``n`` teacher rows in the s1K-1.1 layout (never on the ``exclude`` questions); returns the teacher's stats."""
    rng, rows = random.Random(seed), []
    excl = set(exclude)
    while len(rows) < n:
        p = problem(rng)
        if p["question"] in excl:
            continue
        s = teacher_solution(p, rng)
        rows.append({"question": p["question"], "solution": p["answer"], "deepseek_thinking_trajectory": s["thinking"],
                     "deepseek_attempt": s["attempt"], "deepseek_grade": "Yes" if s["correct"] else "No",
                     "strategy": s["strategy"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"teacher_accuracy": sum(r["deepseek_grade"] == "Yes" for r in rows) / n,
            "teacher_share_ones": sum(r["strategy"] == "ones" for r in rows) / n}


# ----------------------------------------------------------------------------------------------------------------
# the placebo loss


def _shuffled_loss_class():
    from iwsft.losses import ChunkedWeightedNLL

    class _Shuffled(ChunkedWeightedNLL):
        """``ChunkedWeightedNLL`` whose per-sequence weights are permuted within each micro-batch (placebo)."""

        _calls = 0

        def forward(self, token_logp, mask, seq_weights=None, token_weights=None, **kwargs):
            import torch

            if seq_weights is not None and seq_weights.numel() > 1:
                g = torch.Generator().manual_seed(12345 + type(self)._calls)
                type(self)._calls += 1
                seq_weights = seq_weights[torch.randperm(seq_weights.numel(), generator=g).to(seq_weights.device)]
            return super().forward(token_logp, mask, seq_weights=seq_weights, token_weights=token_weights, **kwargs)

    return _Shuffled


def ShuffledChunkedWeightedNLL(*args, **kwargs):  # noqa: N802 - a config component (the recipe checks the name)
    """Placebo loss for the study: the same importance weights, shuffled within each micro-batch."""
    return _shuffled_loss_class()(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# running the recipe


def _env(threads: int = 1) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_recipe(config: str, overrides: Sequence[str], output_dir: Path, nproc: int = 1, timeout: float = 1800,
               log_path: Optional[Path] = None) -> Path:
    """``tune run [--nproc_per_node N] iwsft_distributed --config CONFIG output_dir=... OVERRIDES``; returns the
    latest complete ``epoch_N`` checkpoint. Raises ``RuntimeError`` with the log's tail on failure."""
    from iwsft.demo import latest_checkpoint, tune_command

    args = ["run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else []) + [
        "iwsft_distributed", "--config", config, f"output_dir={output_dir}", *overrides]
    log_path = log_path or Path(output_dir).with_suffix(".log")
    Path(output_dir).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(tune_command(args), stdout=log, stderr=subprocess.STDOUT, env=_env(), timeout=timeout,
                              cwd=str(Path(output_dir).parent))
    if proc.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-4000:]
        raise RuntimeError(f"tune {' '.join(args)} failed ({proc.returncode}); log {log_path}:\n{tail}")
    return latest_checkpoint(output_dir)


def export_model(ckpt: Path, dest: Path) -> Path:
    """Copy an ``epoch_N`` HF checkpoint (weights, config, tokenizer files) to ``dest`` atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "CHECKPOINT_COMPLETE" and not f.name.endswith(".index.json"):
            name = "model.safetensors" if f.suffix == ".safetensors" else f.name
            shutil.copy2(f, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


PRETRAIN = dict(rows=8000, epochs=5, batch_size=16, lr=3e-3, seed=0)


def pretrain(out: Path, rows: int = PRETRAIN["rows"], epochs: int = PRETRAIN["epochs"],
             batch_size: int = PRETRAIN["batch_size"], lr: float = PRETRAIN["lr"], seed: int = PRETRAIN["seed"],
             exclude: Sequence[str] = (), nproc: int = 1) -> Path:
    """Trains ``p_ref`` through the recipe (``method=sft`` on the noisy teacher's rows, all of them: the teacher's
    mistakes are part of the policy) from the random tiny model; writes ``out/model`` and ``out/pretrain.json``."""
    from iwsft.tiny import build_tiny_assets

    out = Path(out).resolve()
    if (out / "pretrain.json").is_file() and (out / "model" / "model.safetensors").is_file():
        return out / "model"
    assets = build_tiny_assets(out / "init", seed=seed, num_rows=8, overwrite=True)
    stats = write_teacher_data(out / "teacher.jsonl", rows, seed=seed + 7, exclude=exclude)
    t0 = time.perf_counter()
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    ckpt = run_recipe("tiny_cpu", [
        f"checkpoint_dir={assets['checkpoint_dir']}", f"dataset.data_files={out / 'teacher.jsonl'}", "method=sft",
        f"epochs={epochs}", "max_steps_per_epoch=null", f"batch_size={batch_size}", f"optimizer.lr={lr}",
        "warmup_ratio=0.05", "enable_activation_checkpointing=false", f"seed={seed}", "log_every_n_steps=50",
    ], run, nproc=nproc, log_path=out / "pretrain.log")
    model = export_model(ckpt, out / "model")
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(out / "init", ignore_errors=True)
    info = {"rows": rows, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1), **stats,
            "teacher": {"P_ONES": P_ONES, "FORGET_CARRY": FORGET_CARRY, "SPLIT_SLIP": SPLIT_SLIP, "SLIP": SLIP},
            "command": f"python -m iwsft.selfimprove pretrain --out {out}"}
    (out / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return model


# ----------------------------------------------------------------------------------------------------------------
# evaluation (held-out prompts, the project's checker)


def evaluate(model_dir, prompts_file: Path, samples: int = 4, max_new_tokens: int = 48, seed: int = 0,
             sampler=None) -> Dict[str, Any]:
    """Greedy and sampled (temperature 1, ``samples`` per prompt) accuracy on held-out prompts.

    Generation is :class:`iwsft.curate.HFSampler` (KV cache, batched); scoring is ``evals.scoring.score_aime``
    (integer answers) through :func:`iwsft.curate.verify`. Also returns the share of each strategy among the
    sampled solutions (``share_ones``/``share_split``) and the mean sampled log-likelihood per token.
    """
    from iwsft.curate import HFSampler, SamplingConfig, load_prompts, resolve_verifier, verify

    prompts = load_prompts(prompts_file)
    sampler = sampler or HFSampler(model_dir)
    vfn = resolve_verifier("aime")
    cfg = SamplingConfig(k=max(samples, 1), temperature=1.0, max_new_tokens=max_new_tokens, batch_prompts=32, seed=seed)
    greedy = sampled = n_s = 0
    strategies = {"ones": 0, "split": 0, "other": 0}
    for start in range(0, len(prompts), cfg.batch_prompts):
        batch = prompts[start:start + cfg.batch_prompts]
        ids = [sampler.prompt_ids([{"role": "system", "content": cfg.system_prompt},
                                   {"role": "user", "content": p.question}]) for p in batch]
        for p, g in zip(batch, sampler.sample(ids, cfg, seed=seed + start, greedy=True)):
            s = g[0]
            greedy += verify(vfn, sampler.decode(s.token_ids), p.answer).reward
        if samples:
            for p, g in zip(batch, sampler.sample(ids, cfg, seed=seed * 7919 + start)):
                for s in g:
                    text = sampler.decode(s.token_ids)
                    sampled += verify(vfn, text, p.answer).reward
                    strategies[strategy_of(text)] += 1
                    n_s += 1
    n = len(prompts)
    out = {"greedy_acc": greedy / n, "prompts": n}
    if n_s:
        out.update({"sampled_acc": sampled / n_s, "samples": n_s,
                    **{f"share_{k}": v / n_s for k, v in strategies.items()}})
    return out


# ----------------------------------------------------------------------------------------------------------------
# the study


@dataclass
class StudyConfig:
    """Sizes of the study (``full()`` is the configuration the README's command runs and its table comes from;
    ``large()`` doubles the data and the evaluation samples; ``smoke()`` checks the plumbing)."""

    seeds: int = 5
    rounds: int = 2
    methods: Sequence[str] = tuple(METHODS)
    train_prompts: int = 128
    eval_prompts: int = 150
    k: int = 8
    eval_samples: int = 2
    epochs: int = 2
    lr: float = 3e-4
    batch_size: int = 16
    max_new_tokens: int = 48
    label: str = "full"

    @classmethod
    def full(cls) -> "StudyConfig":
        return cls()

    @classmethod
    def large(cls) -> "StudyConfig":
        return cls(seeds=5, rounds=2, train_prompts=256, eval_prompts=200, k=8, eval_samples=4, label="large")

    @classmethod
    def smoke(cls) -> "StudyConfig":
        return cls(seeds=2, rounds=1, methods=("sft", "iwsft_t20", "placebo"), train_prompts=16, eval_prompts=12,
                   k=4, eval_samples=1, epochs=1, batch_size=8, label="smoke")


def _done(path: Path) -> Optional[Dict[str, Any]]:
    f = path / "DONE.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _mark(path: Path, info: Dict[str, Any]) -> Dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".DONE.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, path / "DONE.json")
    return info


def weight_log_stats(output_dir: Path) -> Dict[str, float]:
    """Means over the logged steps of the recipe's weight statistics (``weight_mean``, ``weight_std``, ...)."""
    from iwsft.demo import _parse_log

    rows = _parse_log(output_dir)
    keys = ("weight_mean", "weight_std", "weight_min", "weight_max", "weight_ess", "weight_clip_hi",
            "weight_clip_lo", "log_ratio_mean", "nll", "loss")
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    out["steps"] = len(rows)
    return out


def train_and_eval(start_model: Path, samples: Path, out: Path, method: str, seed: int, sc: StudyConfig,
                   heldout: Path, nproc: int = 1) -> Dict[str, Any]:
    """One fine-tuning run through the recipe (``configs/selfcurate_tiny.yaml``) + held-out evaluation."""
    done = _done(out)
    if done:
        return done
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    ckpt = run_recipe("selfcurate_tiny", [
        f"checkpoint_dir={start_model}", f"dataset.data_files={samples}", f"seed={seed}", f"epochs={sc.epochs}",
        f"optimizer.lr={sc.lr}", f"batch_size={sc.batch_size}", *METHODS[method]], run, nproc=nproc,
        log_path=out / "train.log")
    train_s = time.perf_counter() - t0
    stats = weight_log_stats(run)
    summary = json.loads((run / "run_summary.json").read_text()) if (run / "run_summary.json").is_file() else None
    model = export_model(ckpt, out / "model")
    shutil.rmtree(run, ignore_errors=True)
    ev = evaluate(model, heldout, samples=sc.eval_samples, max_new_tokens=sc.max_new_tokens, seed=1000 + seed)
    return _mark(out, {"method": method, "seed": seed, "train_seconds": round(train_s, 1), "weights": stats,
                       "run_summary": summary, **ev})


def curate_round(model: Path, prompts: Path, out: Path, seed: int, sc: StudyConfig) -> Dict[str, Any]:
    from iwsft.curate import SamplingConfig, curate, load_prompts

    done = _done(out)
    if done:
        return done
    cfg = SamplingConfig(k=sc.k, temperature=1.0, max_new_tokens=sc.max_new_tokens, batch_prompts=16, seed=seed)
    s = curate(model, load_prompts(prompts), out, cfg, verifier="aime", progress=False, quiet=True)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["reward"] > 0]
    s["curated_share_ones"] = (sum(strategy_of(r["messages"][-1]["content"]) == "ones" for r in ok) / len(ok)
                               if ok else float("nan"))
    s["sampled_share_ones"] = sum(strategy_of(r["messages"][-1]["content"]) == "ones" for r in rows) / len(rows)
    return _mark(out, s)


def run_seed(args) -> List[Dict[str, Any]]:
    """Every round and method of one seed (sequential; seeds run in parallel processes)."""
    out, seed, sc_dict, pref = args
    import torch

    torch.set_num_threads(1)
    sc = StudyConfig(**sc_dict)
    out = Path(out)
    base = out / f"seed{seed}"
    heldout, train_prompts = out / "prompts" / "heldout.jsonl", out / "prompts" / "train.jsonl"
    results = []
    r0 = _done(base / "round0" / "pref") or _mark(base / "round0" / "pref", {
        "method": "pref", "seed": seed, **evaluate(pref, heldout, samples=sc.eval_samples,
                                                     max_new_tokens=sc.max_new_tokens, seed=1000 + seed)})
    for m in sc.methods:
        results.append({**r0, "method": m, "round": 0})
    models = {m: Path(pref) for m in sc.methods}
    for r in range(1, sc.rounds + 1):
        shared = None
        for m in sc.methods:
            if r == 1:  # every method starts from p_ref and trains on the very same curated rows
                shared = shared or curate_round(models[m], train_prompts, base / "round1" / "curated", seed, sc)
                cur, cdir = shared, base / "round1" / "curated"
            else:  # expert iteration: each method samples from its own model
                cdir = base / f"round{r}" / m / "curated"
                cur = curate_round(models[m], train_prompts, cdir, seed * 100 + r, sc)
            res = train_and_eval(models[m], cdir / "samples.jsonl", base / f"round{r}" / m, m, seed, sc, heldout)
            models[m] = base / f"round{r}" / m / "model"
            results.append({**res, "round": r, "curated": {k: cur.get(k) for k in (
                "accuracy", "pass@1", f"pass@{sc.k}", "share_prompts_with_verified_sample", "correct_samples",
                "not_roundtrip", "truncated", "samples_per_second", "curated_share_ones", "sampled_share_ones")}})
    return results


def collect(out: Path, sc: StudyConfig) -> List[Dict[str, Any]]:
    """The result rows of every finished step under ``out`` (``DONE.json`` files), without running anything:
    ``--report-only`` builds the table from a study that is still running or was stopped."""
    rows: List[Dict[str, Any]] = []
    for seed in range(sc.seeds):
        base = Path(out) / f"seed{seed}"
        r0 = _done(base / "round0" / "pref")
        if r0:
            rows += [{**r0, "method": m, "round": 0} for m in sc.methods]
        for r in range(1, sc.rounds + 1):
            for m in sc.methods:
                res = _done(base / f"round{r}" / m)
                cur = _done(base / "round1" / "curated") if r == 1 else _done(base / f"round{r}" / m / "curated")
                if res:
                    rows.append({**res, "round": r, "curated": {k: (cur or {}).get(k) for k in (
                        "accuracy", f"pass@{sc.k}", "correct_samples", "curated_share_ones")}})
    return rows


# Student-t 0.975 quantiles for 1..10 degrees of freedom (scipy.stats.t.ppf), so scipy is not a dependency
_T975 = (12.706204736174698, 4.302652729749464, 3.182446305284263, 2.7764451051977987, 2.5705818356363146,
         2.446911851144969, 2.3646242515927844, 2.3060041352041662, 2.262157162798205, 2.2281388519649385)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:  # Cornish-Fisher expansion around the normal quantile: within 0.1% for df > 10
        z = 1.959963984540054
        return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(xs: Sequence[float]) -> tuple:
    """Mean and Student-t 95% interval of the mean (``(mean, lo, hi)``; a single value has no interval)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = _t975(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h


def report(out: Path, rows: List[Dict[str, Any]], sc: StudyConfig, seconds: float, versions: Dict[str, str]) -> str:
    """Writes ``table.md``, ``accuracy.png`` and ``weights.png``; returns the table (markdown)."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["round"], r["method"]): r for r in rows}
    methods = [m for m in sc.methods]
    lines = [f"Self-curation study ({sc.label} configuration), {time.strftime('%Y-%m-%d')}: {len(seeds)} paired "
             f"seeds, {sc.rounds} round(s), {sc.train_prompts} training prompts × k={sc.k} samples (temperature 1), "
             f"{sc.eval_prompts} held-out prompts (greedy, and {sc.eval_samples} samples each at temperature 1), "
             f"{sc.epochs} epochs at lr {sc.lr}, batch {sc.batch_size}. "
             + (f"Wall time {seconds / 60:.1f} min (this invocation; steps finished earlier were reused). "
                if math.isfinite(seconds) else "")
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
             "",
             "| round | method | seeds | greedy acc | sampled acc | Δ greedy vs SFT [95% CI] | Δ sampled vs SFT [95% CI] "
             "| ones % | curated rows | weight mean / std / max | ESS | clip hi |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sig = []

    def cell(diffs):
        if not diffs:
            return "—", None
        m, lo, hi = t_interval(diffs)
        s = (lo > 0 or hi < 0) and hi - lo > 1e-9  # identical differences in every seed: no interval, no test
        return (f"{m * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]" + (" *" if s else "")), s

    for rnd in range(0, sc.rounds + 1):
        for m in (methods if rnd else ["pref"]):
            key_m = methods[0] if rnd == 0 else m
            rs = [by[(s, rnd, key_m)] for s in seeds if (s, rnd, key_m) in by]
            if not rs:
                continue
            g = sum(r["greedy_acc"] for r in rs) / len(rs)
            sa = [r.get("sampled_acc") for r in rs if r.get("sampled_acc") is not None]
            samp = f"{100 * sum(sa) / len(sa):.1f}" if sa else "—"
            dg = ds = "—"
            if rnd and m != "sft":
                pairs = [(by[(s, rnd, m)], by[(s, rnd, "sft")]) for s in seeds
                         if (s, rnd, m) in by and (s, rnd, "sft") in by]
                dg, s1 = cell([a["greedy_acc"] - b["greedy_acc"] for a, b in pairs])
                ds, s2 = cell([a["sampled_acc"] - b["sampled_acc"] for a, b in pairs
                               if a.get("sampled_acc") is not None and b.get("sampled_acc") is not None])
                sig.append((rnd, m, s1, s2))
            w = [r.get("weights", {}) for r in rs]
            wtxt = ess = clip = "—"
            if rnd and m != "sft" and all("weight_mean" in x for x in w):
                avg = lambda k: sum(x.get(k, float("nan")) for x in w) / len(w)  # noqa: E731
                wtxt = f"{avg('weight_mean'):.3f} / {avg('weight_std'):.3f} / {avg('weight_max'):.2f}"
                ess, clip = f"{avg('weight_ess'):.3f}", f"{avg('weight_clip_hi'):.3f}"
            cur = [r.get("curated", {}).get("correct_samples") for r in rs if r.get("curated")]
            curtxt = f"{sum(cur) / len(cur):.0f}" if cur and None not in cur else "—"
            ones = [r.get("share_ones") for r in rs if r.get("share_ones") is not None]
            onetxt = f"{100 * sum(ones) / len(ones):.0f}" if ones else "—"
            lines.append(f"| {rnd} | {'p_ref' if rnd == 0 else m} | {len(rs)} | {100 * g:.1f} | {samp} | {dg} | {ds} "
                         f"| {onetxt} | {curtxt} | {wtxt} | {ess} | {clip} |")
    sig_txt = [f"round {r} {m}: greedy {'significant' if a else 'not significant'}, sampled "
               f"{'significant' if b else 'not significant'}" for r, m, a, b in sig]
    lines += ["", "Accuracies in %, means over seeds; Δ = paired difference (same seed, same start model, same "
              "curated rows in round 1, same data order, steps and lr), mean and Student-t 95% interval over seeds; "
              "* = the interval excludes 0. Placebo = the iwsft_t20 weights shuffled within each micro-batch. "
              "ones % = share of sampled held-out solutions that use the less accurate column strategy.",
              "", "Significance at the 95% level: " + "; ".join(sig_txt) + "."]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    try:
        _plots(out, rows, sc, seeds)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the table
        print(f"[selfimprove] plots failed: {e}", file=sys.stderr)
    return table


def _plots(out: Path, rows, sc: StudyConfig, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["seed"], r["round"], r["method"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("greedy_acc", "sampled_acc")):
        for j, m in enumerate(sc.methods):
            xs, ms, errs = [], [], []
            for rnd in range(sc.rounds + 1):
                vals = [by[(s, rnd, m)].get(key) for s in seeds if (s, rnd, m) in by]
                vals = [v for v in vals if v is not None]
                if not vals:
                    continue
                mean, lo, hi = t_interval(vals)
                xs.append(rnd + 0.04 * (j - len(sc.methods) / 2))
                ms.append(100 * mean)
                # the t interval of an accuracy can leave [0, 1] with few seeds: draw it clipped to [0, 100] %
                errs.append((0, 0) if math.isnan(lo) else (100 * (mean - max(lo, 0.0)), 100 * (min(hi, 1.0) - mean)))
            ax.errorbar(xs, ms, yerr=np.array(errs).T if errs else None, marker="o", capsize=3, label=m)
        ax.set_xlabel("round (0 = p_ref)")
        ax.set_ylabel(f"held-out {key.replace('_acc', '')} accuracy (%)")
        ax.set_xticks(range(sc.rounds + 1))
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Self-curation: held-out accuracy per round (mean, 95% interval over seeds)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    iw = [m for m in sc.methods if m != "sft"]
    keys = ("weight_mean", "weight_std", "weight_max", "weight_ess", "weight_clip_hi", "log_ratio_mean")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for ax, k in zip(axes, keys):
        for j, m in enumerate(iw):
            for rnd in range(1, sc.rounds + 1):
                vals = [by[(s, rnd, m)].get("weights", {}).get(k) for s in seeds if (s, rnd, m) in by]
                vals = [v for v in vals if v is not None]
                if vals:
                    ax.bar(j + 0.4 * (rnd - 1) / max(sc.rounds, 1), sum(vals) / len(vals), width=0.4 / sc.rounds,
                           color=f"C{j}", alpha=1.0 if rnd == 1 else 0.55)
        ax.set_xticks(range(len(iw)))
        ax.set_xticklabels(iw, rotation=45, fontsize=7)
        ax.set_title(k, fontsize=9)
    fig.suptitle("Importance-weight statistics (mean over training steps and seeds; paler bar = later round)")
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    plt.close(fig)


def _versions() -> Dict[str, str]:
    import torch
    import transformers

    import torchtune

    return {"torch": torch.__version__, "torchtune": torchtune.__version__, "transformers": transformers.__version__}


def study(out, sc: StudyConfig, jobs: int = 2, pref: Optional[Path] = None,
          only_seeds: Optional[Sequence[int]] = None) -> str:
    """Runs (or resumes) the whole study and writes the report; returns the table."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg_path = out / "study.json"
    cfg = asdict(sc)
    cfg["methods"] = list(sc.methods)
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old != cfg:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in sorted(set(old) | set(cfg))
                             if old.get(k) != cfg.get(k))
            raise ValueError(f"--out {out} holds a study with other settings ({diff}); rerun with the settings it "
                             f"was made with (--config {old.get('label')}, --seeds/--rounds as before) to resume it, "
                             f"or use another --out")
    _write_if_changed(cfg_path, json.dumps(cfg, indent=1))
    if pref is None:
        pref = ASSET_DIR if (ASSET_DIR / "model.safetensors").is_file() else pretrain(out / "pref")
    pref = Path(pref).resolve()
    heldout = write_prompts(out / "prompts" / "heldout.jsonl", sc.eval_prompts, seed=424242)
    write_prompts(out / "prompts" / "train.jsonl", sc.train_prompts, seed=17, exclude=[r["question"] for r in heldout])
    tasks = [(str(out), s, cfg, str(pref)) for s in range(sc.seeds) if only_seeds is None or s in only_seeds]
    rows: List[Dict[str, Any]] = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for res in ex.map(run_seed, tasks):
                rows += res
    else:
        for t in tasks:
            rows += run_seed(t)
    if only_seeds is not None:  # part of a study: the table comes from --report-only once every part is done
        return ""
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = report(out, rows, sc, time.perf_counter() - t0, _versions())
    print(table)
    return table


# wall time measured for each configuration (2-core machine, 2026-11-30); None: not run
MEASURED = {"smoke": "about 1.5 min", "full": "9.1 min with --jobs 2 on 2 free cores (2026-11-30)", "large": None}


def _config_help() -> str:
    """One line per configuration: sizes (from :class:`StudyConfig`) and the measured wall time."""
    lines = ["configurations (--config):"]
    for name in ("smoke", "full", "large"):
        c = getattr(StudyConfig, name)()
        t = MEASURED[name] or "not run yet"
        def n(k: int, word: str) -> str:
            return f"{k} {word}" + ("" if k == 1 else "s")
        lines.append(textwrap.fill(f"  {name:<8} {n(c.seeds, 'seed')} x {n(c.rounds, 'round')}, "
                     f"{n(len(c.methods), 'method')}; curate {c.train_prompts} training prompts x k={c.k} samples; "
                     f"evaluate on {c.eval_prompts} held-out prompts (greedy + {n(c.eval_samples, 'sampled answer')} "
                     f"each); {n(c.epochs, 'epoch')}, batch {c.batch_size}. Time: {t}.",
                                   width=100, subsequent_indent=" " * 11))
    lines.append("The README's table comes from --config full (the default).")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iwsft.selfimprove", description=__doc__.split("\n\n")[0],
                                 epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("pretrain", help="(re)build p_ref through the recipe")
    p.add_argument("--out", default="runs/pref_build", help="build directory (default: %(default)s)")
    p.add_argument("--install", action="store_true", help=f"then copy the model to {ASSET_DIR} (the shipped asset)")
    ap.add_argument("--out", default="runs/selfimprove", help="study directory; rerunning into it resumes "
                    "(finished steps are skipped) (default: %(default)s)")
    ap.add_argument("--config", choices=("full", "large", "smoke"), default=None,
                    help="study size, see below (default: full; --report-only: the study's own)")
    ap.add_argument("--seeds", type=int, default=None, help="number of paired seeds (0..N-1), overriding the "
                    "configuration's (full/large: 5, smoke: 2)")
    ap.add_argument("--rounds", type=int, default=None, help="curate + fine-tune rounds after p_ref, overriding the "
                    "configuration's (full/large: 2, smoke: 1)")
    ap.add_argument("--jobs", type=int, default=2, help="seeds in parallel (one thread each) (default: %(default)s)")
    ap.add_argument("--pref", default=None, help="p_ref model dir (default: the shipped asset, else pretrain)")
    ap.add_argument("--report-only", action="store_true", help="table and plots from the finished steps only")
    ap.add_argument("--only-seeds", default=None, help="comma-separated seeds to run (e.g. to spread them over "
                    "machines or processes); then --report-only builds the table")
    a = ap.parse_args(argv)
    a.config_given = a.config is not None
    a.config = a.config or "full"
    if a.cmd == "pretrain":
        model = pretrain(Path(a.out))
        if a.install:
            export_model(model, ASSET_DIR)
            shutil.copy2(Path(a.out) / "pretrain.json", ASSET_DIR / "pretrain.json")
        print(f"p_ref: {model}")
        return 0
    try:
        return _run_study_cli(a)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming the option and the fix
        if os.environ.get("IWSFT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _study_config_from_args(a) -> StudyConfig:
    """The configuration the options ask for; every override checked (ValueError naming the option)."""
    sc = getattr(StudyConfig, a.config)()
    for opt, val in (("--seeds", a.seeds), ("--rounds", a.rounds), ("--jobs", a.jobs)):
        if val is not None and val < 1:
            raise ValueError(f"{opt} {val}: must be an integer >= 1")
    if a.seeds is not None:
        sc.seeds = a.seeds
    if a.rounds is not None:
        sc.rounds = a.rounds
    return sc


def _run_study_cli(a) -> int:
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory: pass a directory (new or a study's)")
    sc = _study_config_from_args(a)
    only = None
    if a.only_seeds is not None:
        try:
            only = sorted({int(x) for x in a.only_seeds.split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"--only-seeds {a.only_seeds!r}: expected comma-separated seed numbers such as 0,3")
        bad = [x for x in only if not 0 <= x < sc.seeds]
        if not only or bad:
            raise ValueError(f"--only-seeds {a.only_seeds!r}: seeds must lie in 0..{sc.seeds - 1} (--seeds {sc.seeds})")
    if a.report_only:
        cfg_path = out / "study.json"
        if not cfg_path.is_file():
            raise ValueError(f"--report-only: {out} holds no study (no study.json); run the study into this --out "
                             "first, or point --out at a study directory")
        saved = json.loads(cfg_path.read_text())
        asked = asdict(sc)
        asked["methods"] = list(sc.methods)
        explicit = a.config_given or a.seeds is not None or a.rounds is not None
        if explicit and saved != asked:
            diff = ", ".join(f"{k}: {saved.get(k)!r} (study) vs {asked.get(k)!r} (asked)" for k in sorted(saved)
                             if saved.get(k) != asked.get(k))
            raise ValueError(f"--report-only: the study in {out} was made with other settings ({diff}); drop "
                             "--config/--seeds/--rounds to report it as it was made")
        sc = StudyConfig(**{**saved, "methods": tuple(saved["methods"])})
        rows = collect(out, sc)
        if not rows:
            raise ValueError(f"--report-only: no finished step in {out} yet (no DONE.json); nothing to report")
        with open(out / "results.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(report(out, rows, sc, float("nan"), _versions()))
        return 0
    if a.pref is not None and not (Path(a.pref) / "config.json").is_file():
        raise ValueError(f"--pref {a.pref}: not a model directory (no config.json there); pass a directory written "
                         "by `python -m iwsft.selfimprove pretrain --out DIR` (DIR/model) or leave --pref out for "
                         "the shipped p_ref")
    study(a.out, sc, jobs=a.jobs, pref=Path(a.pref) if a.pref else None, only_seeds=only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
