"""Evaluate trained checkpoints on the iwsft tasks with every s1-protocol knob set (lm-eval Python API).

    python -m evals.run --checkpoint OUT/epoch_4 --tasks aime24,aime25,math500 --backend vllm
    python -m evals.run --checkpoint OUT/epoch_4 --tasks aime24 --samples 16 --temperature 0.7
    python -m evals.run --checkpoint SFT/epoch_4 --compare IWSFT/epoch_4 --tasks aime24,math500

For each checkpoint: the greedy run (the headline), and with ``--samples K`` also K samples per problem at
``--temperature`` (avg@K with a bootstrap 95% interval over problems, maj@K, pass@K). Writes, under ``--output``,
``<label>/greedy/`` and ``<label>/k<K>_t<T>/`` (lm-eval's results JSON and per-task samples JSONL),
``<label>/summary.json``, and ``summaries.json`` + ``summary.txt`` (the table printed at the end) for all
checkpoints.
A ``--checkpoint``/``--compare`` directory that already holds a ``summary.json`` from this runner is read, not
re-evaluated.

Settings: the chat template of the checkpoint's tokenizer, ``max_model_len``/``max_length`` = longest prompt +
``max_gen_toks`` (+ the budget-forcing extras), tensor parallel size = largest divisor of the attention-head
count not above the visible GPU count, seeds fixed (``--seed``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from evals import TASKS_DIR, task_name
from evals.metrics import bootstrap_ci

log = logging.getLogger("evals.run")

SUMMARY_FILE = "summary.json"
PROMPT_MARGIN = 16  # tokens of slack on top of the longest prompt


# --------------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF-format checkpoint directory (e.g. OUT/epoch_4)")
    p.add_argument("--compare", default=None, help="a second checkpoint (or runner output) shown side by side")
    p.add_argument("--tasks", default="aime24,aime25,math500",
                   help="comma-separated: aime24, aime25, math500, gpqa (default: %(default)s)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--output", default="runs/evals", help="output directory (default: %(default)s)")
    p.add_argument("--samples", type=int, default=0, help="K sampled outputs per problem (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling for --samples")
    p.add_argument("--max-gen-toks", type=int, default=32768, help="generation budget (s1: 32768)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each task (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="model dtype (default: float32, as in s1)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="default: from the GPU count")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--batch-size", default=None, help="lm-eval batch size (default: auto for vllm, 1 for hf)")
    p.add_argument("--device", default=None, help="hf backend device (default: cuda if available, else cpu)")
    p.add_argument("--data-dir", default=None,
                   help="directory with aime_2024.jsonl, aime_2025.jsonl, math500.jsonl[, gpqa_diamond.jsonl] "
                        "(default: $IWSFT_EVAL_DATA, else the HF hub)")
    p.add_argument("--gpqa-data", default=None, help="GPQA Diamond file (CSV/JSON/JSONL); never shipped")
    p.add_argument("--budget-forcing", type=int, default=0, metavar="N",
                   help="vllm only: s1 budget forcing, append 'Wait' N times (0: off)")
    p.add_argument("--thinking-tokens", type=int, default=32000, help="budget forcing: thinking-token cap")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples for the 95%% interval")
    p.add_argument("--label", default=None, help="name of --checkpoint in the tables (default: its dir name)")
    p.add_argument("--compare-label", default=None, help="name of --compare in the tables")
    return p


# --------------------------------------------------------------------------------------------------- settings


def visible_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def tensor_parallel_size(num_gpus: int, num_heads: int | None, num_kv_heads: int | None = None) -> int:
    """Largest tp <= num_gpus dividing the attention-head count (and compatible with the KV heads)."""
    if num_gpus <= 1:
        return 1
    for tp in range(num_gpus, 0, -1):
        if num_heads and num_heads % tp:
            continue
        if num_kv_heads and not (num_kv_heads % tp == 0 or tp % num_kv_heads == 0):
            continue
        return tp
    return 1


def read_model_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def data_metadata(args) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if args.data_dir:
        meta["data_dir"] = str(Path(args.data_dir).resolve())
    if args.gpqa_data:
        meta["gpqa_data"] = str(Path(args.gpqa_data).resolve())
    return meta


def longest_prompt_tokens(checkpoint: Path, keys: list[str], metadata: dict, limit: int | None) -> int:
    """Token count of the longest chat-templated prompt among the problems that will be evaluated."""
    from transformers import AutoTokenizer

    from evals.data import load_rows

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    longest = 0
    for key in keys:
        rows = load_rows("gpqa" if key == "gpqa_diamond" else key, metadata)
        if limit is not None:
            rows = rows[:limit]
        for row in rows:
            text = tok.apply_chat_template([{"role": "user", "content": row["problem"]}], tokenize=False,
                                           add_generation_prompt=True)
            longest = max(longest, len(tok(text, add_special_tokens=False)["input_ids"]))
    return longest


def model_settings(args, checkpoint: Path, keys: list[str], metadata: dict) -> tuple[str, dict[str, Any], dict]:
    """(lm-eval model name, model args, info) for one checkpoint."""
    cfg = read_model_config(checkpoint)
    prompt = longest_prompt_tokens(checkpoint, keys, metadata, args.limit)
    extra = 0
    if args.budget_forcing:
        extra = 16 * (args.budget_forcing + 2)  # think start, Waits, answer delimiter, "Final Answer:"
    max_len = prompt + args.max_gen_toks + extra + PROMPT_MARGIN
    info: dict[str, Any] = {"longest_prompt_tokens": prompt, "max_model_len": max_len}
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and max_len > max_pos and not cfg.get("rope_scaling"):
        log.warning("prompt + max_gen_toks = %d exceeds max_position_embeddings = %d of %s; positions beyond it "
                    "are extrapolated (pass --max-gen-toks %d to stay inside)", max_len, max_pos, checkpoint,
                    max(1, max_pos - prompt - extra - PROMPT_MARGIN))
        os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    if args.backend == "vllm":
        gpus = visible_gpu_count()
        tp = args.tensor_parallel_size or tensor_parallel_size(gpus, cfg.get("num_attention_heads"),
                                                                cfg.get("num_key_value_heads"))
        margs = {
            "pretrained": str(checkpoint),
            "tensor_parallel_size": tp,
            "dtype": args.dtype or "float32",
            "max_model_len": max_len,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "seed": args.seed,
        }
        name = "vllm"
        if args.budget_forcing:
            name = "vllm_bf"
            margs.update(bf_wait=args.budget_forcing, bf_thinking_tokens=args.thinking_tokens)
        info.update(tensor_parallel_size=tp, visible_gpus=gpus)
    else:
        if args.budget_forcing:
            raise SystemExit("--budget-forcing needs --backend vllm")
        device = args.device or ("cuda" if visible_gpu_count() else "cpu")
        margs = {"pretrained": str(checkpoint), "dtype": args.dtype or "float32", "device": device,
                 "max_length": max_len}
        name = "hf"
        info.update(device=device)
    return name, margs, info


# --------------------------------------------------------------------------------------------------- running


def make_lm(name: str, margs: dict[str, Any], batch_size):
    import lm_eval.models  # noqa: F401  (get_model registers the built-ins only while the registry is empty)
    from lm_eval.api.registry import get_model

    if name == "vllm_bf":
        from evals.budget import register

        register()
    cls = get_model(name)
    return cls.create_from_arg_obj(margs, {"batch_size": batch_size})


def evaluate_run(lm, keys: list[str], metadata: dict, out_dir: Path, *, repeats: int, gen_kwargs: dict,
                 limit: int | None, seed: int, model_args: dict | None = None
                 ) -> tuple[dict, dict[str, list[dict]]]:
    """One lm-eval run (all tasks) with ``repeats`` outputs per problem; saves results + samples in ``out_dir``."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    loaded = tm.load([task_name(k) for k in keys])["tasks"]
    tasks = []
    for tname in [task_name(k) for k in keys]:
        task = loaded[tname]
        task.config.repeats = repeats
        tasks.append(task)
    tracker = EvaluationTracker(output_path=str(out_dir))
    results = simple_evaluate(
        model=lm, model_args=model_args, tasks=tasks, task_manager=tm, limit=limit, apply_chat_template=True,
        log_samples=True, gen_kwargs=gen_kwargs, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, evaluation_tracker=tracker,
    )
    if results is None:  # non-zero rank in a distributed launch
        return {}, {}
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for tname in results["configs"]:
        tracker.save_results_samples(task_name=tname, samples=samples[tname])
    results["files"] = sorted(str(p) for p in out_dir.rglob("*.json*"))
    return results, samples


def _kind(key: str) -> str:
    return {"aime24": "aime", "aime25": "aime", "math500": "math", "gpqa_diamond": "gpqa"}[key]


def recount_unread(samples: list[dict], key: str, count_tokens, max_gen_toks: int) -> dict[str, int]:
    """(no_answer, truncated) of one task's outputs with the truncation read off the generated token count.

    lm-eval's ``process_results`` sees only the text, so the task metrics infer truncation from it (see
    :func:`evals.scoring.looks_truncated`); the runner has the tokenizer and ``max_gen_toks``, so it recounts the
    outputs the task scored unread: ``count_tokens(output) >= max_gen_toks`` is ``truncated``, else ``no_answer``.
    The set of unread outputs (and so ``acc``) is the task's own; only the split between the two counts changes.
    """
    from evals.scoring import ANSWERED, verify

    counts = {"no_answer": 0, "truncated": 0}
    for s in samples:
        if not (s.get("no_answer", 0) or s.get("truncated", 0) or s.get("unparseable", 0)):
            continue
        doc = s["doc"]
        for out in s["resps"][0]:
            v = verify(_kind(key), out, doc["answer"], choices=list(doc.get("choices") or []) or None)
            if v.status == ANSWERED:
                continue
            counts["truncated" if count_tokens(out) >= max_gen_toks else "no_answer"] += 1
    return counts


def summarise_run(results: dict, samples: dict[str, list[dict]], keys: list[str], n_boot: int, seed: int,
                  count_tokens=None, max_gen_toks: int | None = None) -> dict[str, dict]:
    """Per-task figures of one lm-eval run; with ``count_tokens`` (output text -> generated token count) and
    ``max_gen_toks``, no_answer/truncated come from :func:`recount_unread` (``truncation_from: tokens``), else from
    the task metrics (``truncation_from: text``)."""
    out = {}
    for key in keys:
        tname = task_name(key)
        res = results["results"][tname]
        per_doc = [float(s["acc"]) for s in sorted(samples[tname], key=lambda s: s["doc_id"])]
        mean, lo, hi = bootstrap_ci(per_doc, n_boot=n_boot, seed=seed)
        k = len(samples[tname][0]["resps"][0]) if samples[tname] else 0  # resps: [[out_1 .. out_k]]
        out[key] = {
            "task": tname,
            "n": len(per_doc),
            "k": k,
            "acc": res["acc,none"],
            "ci95": [lo, hi],
            "maj_at_k": res["maj_at_k,none"],
            "pass_at_k": res["pass_at_k,none"],
            "unparseable": int(res["unparseable,none"]),
            "no_answer": int(res.get("no_answer,none", res["unparseable,none"])),
            "truncated": int(res.get("truncated,none", 0)),
            "truncation_from": "text",
            "outputs": len(per_doc) * k,
        }
        if count_tokens is not None and max_gen_toks is not None:
            out[key].update(recount_unread(samples[tname], key, count_tokens, max_gen_toks), truncation_from="tokens")
    return out


def token_counter(checkpoint: Path):
    """output text -> number of tokens the checkpoint's tokenizer gives it (the generated token count)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def evaluate_checkpoint(args, checkpoint: Path, label: str, out_root: Path) -> dict:
    keys = parse_tasks(args.tasks)
    metadata = data_metadata(args)
    name, margs, info = model_settings(args, checkpoint, keys, metadata)
    out_dir = out_root / label
    log.info("evaluating %s with %s %s", checkpoint, name, margs)
    t0 = time.time()
    lm = make_lm(name, margs, args.batch_size or ("auto" if args.backend == "vllm" else 1))
    summary: dict[str, Any] = {
        "label": label, "checkpoint": str(checkpoint), "backend": name, "model_args": margs, "settings": info,
        "tasks": keys, "limit": args.limit, "max_gen_toks": args.max_gen_toks, "seed": args.seed,
        "samples": args.samples, "temperature": args.temperature if args.samples else None, "runs": {},
    }
    t1 = time.time()
    res, smp = evaluate_run(lm, keys, metadata, out_dir / "greedy", repeats=1,
                            gen_kwargs={"do_sample": False, "temperature": 0.0, "max_gen_toks": args.max_gen_toks},
                            limit=args.limit, seed=args.seed, model_args=margs)
    count_tokens = token_counter(checkpoint)
    summary["runs"]["greedy"] = {"dir": str(out_dir / "greedy"), "files": res.get("files", []),
                                 "seconds": round(time.time() - t1, 1),
                                 "tasks": summarise_run(res, smp, keys, args.bootstrap, args.seed, count_tokens,
                                                        args.max_gen_toks)}
    if args.samples:
        run_name = f"k{args.samples}_t{args.temperature:g}"
        gk: dict[str, Any] = {"do_sample": True, "temperature": args.temperature, "max_gen_toks": args.max_gen_toks}
        if args.top_p is not None:
            gk["top_p"] = args.top_p
        t1 = time.time()
        res, smp = evaluate_run(lm, keys, metadata, out_dir / run_name, repeats=args.samples, gen_kwargs=gk,
                                limit=args.limit, seed=args.seed, model_args=margs)
        summary["runs"]["sampled"] = {"dir": str(out_dir / run_name), "files": res.get("files", []),
                                      "seconds": round(time.time() - t1, 1),
                                      "tasks": summarise_run(res, smp, keys, args.bootstrap, args.seed,
                                                             count_tokens, args.max_gen_toks)}
    summary["seconds"] = round(time.time() - t0, 1)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def parse_tasks(spec: str) -> list[str]:
    keys = []
    for part in spec.split(","):
        if part.strip():
            key = task_name(part)[: -len("_iwsft")]
            if key not in keys:
                keys.append(key)
    if not keys:
        raise SystemExit("no tasks given")
    return keys


# --------------------------------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _count(t: dict, key: str) -> str:
    # summaries written before the no_answer/truncated split carry only "unparseable"
    return str(t[key]) if key in t else "-"


def table(summaries: list[dict]) -> str:
    """One screen: a row per task and checkpoint."""
    k = next((s["samples"] for s in summaries if s.get("samples")), 0)
    head = ["task", "model", "n", "greedy", "no_answer", "truncated"]
    if k:
        head += [f"avg@{k} [95% CI]", f"maj@{k}", f"pass@{k}", "no_answer", "truncated"]
    rows = [head]
    tasks: list[str] = []
    for s in summaries:
        for t in s["tasks"]:
            if t not in tasks:
                tasks.append(t)
    for t in tasks:
        for s in summaries:
            g = s["runs"]["greedy"]["tasks"].get(t)
            if g is None:
                continue
            row = [task_name(t), s["label"], str(g["n"]), _pct(g["acc"]), _count(g, "no_answer"),
                   _count(g, "truncated")]
            if k:
                sm = s["runs"].get("sampled", {}).get("tasks", {}).get(t)
                if sm:
                    lo, hi = sm["ci95"]
                    row += [f"{_pct(sm['acc'])} [{_pct(lo)}, {_pct(hi)}]", _pct(sm["maj_at_k"]),
                            _pct(sm["pass_at_k"]), f"{_count(sm, 'no_answer')}/{sm['outputs']}",
                            f"{_count(sm, 'truncated')}/{sm['outputs']}"]
                else:
                    row += ["-"] * 5
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = ("scores in %; greedy = s1 protocol (temperature 0); no_answer = finished without a readable answer, "
            "truncated = no readable answer and hit max_gen_toks (both scored wrong)")
    limits = {s.get("limit") for s in summaries} - {None}
    if limits:
        note += f"; LIMITED to the first {'/'.join(str(x) for x in sorted(limits))} problems per task"
    if k:
        t = next(s["temperature"] for s in summaries if s.get("samples"))
        note += f"; avg/maj/pass over {k} samples at temperature {t:g}, CI = bootstrap over problems"
        other = [s["label"] for s in summaries if s.get("samples") and (s["samples"], s["temperature"]) != (k, t)]
        if other:
            note += f"; CAUTION: {', '.join(other)} sampled with another k or temperature (see summaries.json)"
    return "\n".join(lines + ["", note])


# --------------------------------------------------------------------------------------------------- main


def default_labels(paths: list[Path]) -> list[str]:
    """Directory names; when they clash (SFT/epoch_4 vs IWSFT/epoch_4) parent_name for all of them."""
    names = [p.name or "checkpoint" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}_{p.name}" for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def _argv_for(args, checkpoint: str, label: str) -> list[str]:
    """Re-invocation of this runner for one checkpoint (fresh process per vLLM engine)."""
    argv = [sys.executable, "-m", "evals.run", "--checkpoint", checkpoint, "--label", label]
    skip = {"checkpoint", "compare", "label", "compare_label"}
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        argv += [action.option_strings[0], str(value)]
    return argv


def main(argv: list[str] | None = None) -> int:
    from evals.data import DataUnavailableError

    try:
        return _main(argv)
    except DataUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_root = Path(args.output)
    out_root.mkdir(parents=True, exist_ok=True)
    parse_tasks(args.tasks)  # fail early on unknown names
    if args.samples < 0 or (args.samples and args.temperature <= 0):
        raise SystemExit(f"--samples {args.samples} --temperature {args.temperature}: sampling needs --samples K >= 1 "
                         "and --temperature > 0 (the greedy run is always done; --samples 0 means greedy only)")
    entries = [(args.checkpoint, args.label)]
    if args.compare:
        entries.append((args.compare, args.compare_label))
    summaries = []
    paths = [Path(ckpt).expanduser().resolve() for ckpt, _ in entries]
    defaults = default_labels(paths)
    for (ckpt, label), path, default in zip(entries, paths, defaults):
        if (path / SUMMARY_FILE).is_file():  # an earlier runner output: reuse
            summary = json.loads((path / SUMMARY_FILE).read_text())
            summary["label"] = label or summary["label"]
        elif not path.is_dir():
            raise SystemExit(f"{ckpt}: not a directory")
        else:
            label = label or default
            if args.compare and args.backend == "vllm":
                # one vLLM engine per process: tearing one down and starting another in-process is unreliable
                subprocess.run(_argv_for(args, str(path), label), check=True)
                summary = json.loads((out_root / label / SUMMARY_FILE).read_text())
            else:
                summary = evaluate_checkpoint(args, path, label, out_root)
        summaries.append(summary)
    text = table(summaries)
    (out_root / "summary.txt").write_text(text + "\n")
    (out_root / "summaries.json").write_text(json.dumps({"checkpoints": summaries}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
