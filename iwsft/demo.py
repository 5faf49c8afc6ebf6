"""End-to-end iw-SFT demo on CPU, fully offline: ``python -m iwsft.demo`` (or the ``iwsft-demo`` script).

1. builds a tiny random Qwen2 model, its tokenizer and a 32-row s1K-style dataset (:mod:`iwsft.tiny`) in
   ``<workdir>/assets`` (reused when already complete);
2. trains it with the stock torchtune CLI, 2 gloo processes::

       tune run --nproc_per_node 2 iwsft_distributed --config tiny_cpu \\
           checkpoint_dir=<workdir>/assets/model dataset.data_files=<workdir>/assets/data/s1k_tiny.jsonl \\
           output_dir=<workdir>/run

   (the recipe prints the loss and the importance-weight statistics every step);
3. loads the saved HF checkpoint (``<workdir>/run/epoch_N``) with ``transformers``, reports the mean NLL of the
   training answers before and after training, and greedily generates a reply to one of the chat prompts.

``<workdir>/run`` is replaced on every run (only if an earlier demo created it); extra ``key=value`` arguments
are passed to ``tune run`` as config overrides (e.g. ``method=sft``, ``epochs=1``). By default the demo trains
on 256 rows for 3 epochs (192 steps, :data:`DEMO_OVERRIDES`), about a minute in all on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
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
# Longer than the config's smoke-test schedule so the tiny model visibly learns the s1 format: 256 rows, 3 epochs
# = 192 optimizer steps on 2 processes (about 35 s of training on 2 CPU cores). A user override of a key wins.
DEMO_NUM_ROWS = 256
DEMO_OVERRIDES = ("epochs=3", "max_steps_per_epoch=null")

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


def answer_nll(model_dir, assets: Dict[str, str], max_rows: int = 32) -> float:
    """Mean NLL per trained token (assistant answers, s1 format) of the HF model in ``model_dir`` on the tiny data.

    Tokens/labels come from :func:`iwsft.tune.datasets.s1k_dataset`; ``nll = -Σ log p(label) / #labels`` with the
    usual one-step shift (position t predicts label t+1).
    """
    import torch
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    from transformers import AutoModelForCausalLM

    from iwsft.tune.collate import padded_collate_iwsft
    from iwsft.tune.datasets import s1k_dataset

    logging.getLogger("iwsft.tune.datasets").setLevel(logging.WARNING)  # the training log already showed it
    tok = qwen2_5_tokenizer(path=assets["vocab"], merges_file=assets["merges"],
                            special_tokens_path=assets["tokenizer_json"])
    ds = s1k_dataset(tok, source=assets["data"])
    batch = padded_collate_iwsft([ds[i] for i in range(min(max_rows, len(ds)))], padding_idx=tok.pad_id)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(logp * valid).sum() / valid.sum())


def generate(model_dir, question: str, max_new_tokens: int = 32) -> str:
    """Greedy reply of the HF model in ``model_dir`` to ``question`` (Qwen chat template, default system prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)


def _run_streaming(cmd: List[str], log_path: Path, env: Dict[str, str], timeout: float) -> int:
    """Runs ``cmd``, echoing its output and copying it to ``log_path``; kills it after ``timeout`` seconds."""
    import threading

    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=env, text=True, bufsize=1,
                                                      start_new_session=True) as proc:
        def pump():  # a thread, so a silent hang cannot block the timeout below
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun's workers live in the session we created: signal the whole group so none is left behind
            os.killpg(proc.pid, 9)
            proc.wait()
            reader.join(timeout=5)
            raise RuntimeError(f"training did not finish within {timeout:.0f} s; see {log_path}") from None
        reader.join(timeout=30)
        return rc


def run_demo(
    workdir="outputs/demo",
    *,
    nproc: int = 2,
    config: str = "tiny_cpu",
    overrides: Sequence[str] = DEMO_OVERRIDES,
    seed: int = 0,
    num_rows: int = DEMO_NUM_ROWS,
    max_new_tokens: int = 32,
    timeout: float = 900.0,
) -> Dict[str, Any]:
    """Runs the three demo steps (see the module docstring) and returns a summary dict.

    Returns: ``assets`` (paths), ``command`` (argv of the training run), ``checkpoint`` (path), ``train_seconds``,
    ``log`` (parsed metric rows), ``nll_before``/``nll_after`` (mean answer-token NLL), ``question``,
    ``generation`` (text).
    """
    from iwsft.tiny import build_tiny_assets

    t0 = time.monotonic()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[iwsft-demo] building tiny assets in {workdir / 'assets'}", flush=True)
    # overwrite: <workdir>/assets is the demo's own scratch; a different --seed/--num-rows rebuilds it
    assets = build_tiny_assets(workdir / "assets", seed=seed, num_rows=num_rows, overwrite=True)

    run_dir = workdir / "run"
    if run_dir.exists():
        if not (run_dir / RUN_MARKER).is_file():
            raise FileExistsError(f"{run_dir} exists and was not made by iwsft.demo; remove it or pick --workdir")
        shutil.rmtree(run_dir)
    run_dir.mkdir()
    (run_dir / RUN_MARKER).write_text("created by python -m iwsft.demo; replaced on the next run\n")

    tune_args = ["run", "--nproc_per_node", str(nproc), "iwsft_distributed", "--config", config,
                 f"checkpoint_dir={assets['checkpoint_dir']}", f"dataset.data_files={assets['data']}",
                 f"output_dir={run_dir}", *overrides]
    cmd = tune_command(tune_args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the processes share the machine's cores
    env["PYTHONUNBUFFERED"] = "1"
    print("[iwsft-demo] training: tune " + " ".join(tune_args), flush=True)
    t1 = time.monotonic()
    rc = _run_streaming(cmd, workdir / "train.log", env, timeout)
    train_s = time.monotonic() - t1
    if rc != 0:
        raise RuntimeError(f"training failed (exit code {rc}); full output in {workdir / 'train.log'}")

    ckpt = latest_checkpoint(run_dir)
    rows = [json.loads(line) for line in Path(assets["data"]).read_text().splitlines()]
    question = rows[0]["question"]
    nll_before = answer_nll(assets["model_dir"], assets)
    nll_after = answer_nll(ckpt, assets)
    text = generate(ckpt, question, max_new_tokens=max_new_tokens)
    log_rows = _parse_log(run_dir)

    print("\n[iwsft-demo] summary", flush=True)
    print(f"  checkpoint (HF format): {ckpt}")
    print(f"  training: {train_s:.1f} s, {len(log_rows)} logged steps on {nproc} process(es)")
    if log_rows:
        first, last = log_rows[0], log_rows[-1]
        for key, what in (("nll", "NLL per token (unweighted)"),
                          ("loss", "training loss (weighted NLL; = NLL for method=sft)")):
            if key in first and key in last:
                print(f"  {what}: step {int(first['step'])} {first[key]:.4f} -> step {int(last['step'])} "
                      f"{last[key]:.4f}")
        stats = {k: v for k, v in last.items() if k.startswith("weight_") or k.startswith("log_ratio")}
        if stats:
            print("  weights (last step): " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(stats.items())))
            if stats.get("weight_clip_hi", 0.0) > 0.5:
                print("  (most weights sit at clip_max: a random model moves several nats per token away from its "
                      "start, so exp(mean log q/p_ref) is large; fine-tuning a pretrained model moves far less)")
    print(f"  answer NLL per token, first 32 training rows, via transformers: {nll_before:.4f} (start model) -> "
          f"{nll_after:.4f} (saved checkpoint)")
    print(f"  prompt: {question!r}")
    print(f"  greedy reply ({max_new_tokens} tokens max): {text!r}")
    print(f"  total {time.monotonic() - t0:.1f} s", flush=True)
    return {"assets": assets, "command": cmd, "checkpoint": str(ckpt), "train_seconds": train_s, "log": log_rows,
            "nll_before": nll_before, "nll_after": nll_after, "question": question, "generation": text}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iwsft-demo", description="Offline CPU demo: tiny Qwen2 + iw-SFT with 2 processes, then generate.",
        epilog="Extra key=value arguments are passed to `tune run` as config overrides (e.g. method=sft).")
    parser.add_argument("--workdir", default="outputs/demo", help="scratch directory (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default: %(default)s)")
    parser.add_argument("--config", default="tiny_cpu", help="registered config name or YAML path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model and data")
    parser.add_argument("--num-rows", type=int, default=DEMO_NUM_ROWS, help="rows of the tiny dataset")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for training")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    given = {a.split("=", 1)[0] for a in extra}
    overrides = [o for o in DEMO_OVERRIDES if o.split("=", 1)[0] not in given] + extra
    run_demo(args.workdir, nproc=args.nproc, config=args.config, overrides=overrides, seed=args.seed,
             num_rows=args.num_rows, max_new_tokens=args.max_new_tokens, timeout=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
