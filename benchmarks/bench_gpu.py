"""GPU throughput benchmark (issue 2, "GPU measurement"): tokens/s per GPU, peak memory and MFU of
``iwsft_distributed`` (``method=sft``, iw-SFT with the ``precomputed`` and with the ``model`` reference) and of
torchtune's own ``full_finetune_distributed``, on the same random-weight model, data and settings.

What it does, in order:

1. Builds, under ``--work``, a random-weight HF checkpoint of the chosen Qwen2.5 shape (``1.5b``: vocab 151936,
   28 layers, d 1536, 12/2 heads, MLP 8960, tied embeddings; ``tiny``: ``iwsft.tiny``'s dims) as bf16
   safetensors, with the tokenizer of ``iwsft.tiny`` (its ids are < 512, so they fit any vocabulary), and a
   synthetic data set whose rows tokenize to just under ``--seq-len`` tokens, twice: in the s1K-1.1 column layout
   (for ``iwsft.tune.datasets.s1k_dataset``) and as OpenAI-style ``messages`` (for torchtune's ``chat_dataset``);
   both give the same token sequences (checked here; the label counts differ by the assistant header, which
   torchtune trains on and we do not).
2. Runs each variant as its own ``tune run --nproc_per_node K <recipe> --config <yaml>`` subprocess, one after
   another. The iw-SFT configs derive from ``configs/qwen_1_5b.yaml`` (``tiny``: ``configs/tiny_cpu.yaml``), the
   torchtune one from its stock ``qwen2_5/1.5B_full``, with the same model, data, batch, accumulation, optimizer,
   chunked loss, activation checkpointing and dtype. Every derived YAML is kept under ``--work/configs``.
   torchtune's stock recipe does not run on CPU (REFERENCE §3: unconditional memory stats and
   ``torch.cpu.empty_cache``), so with ``--device cpu`` it is skipped with that reason.
3. Parses each run's DiskLogger file (``output_dir/logs/log_*.txt``: ``Step N | key:value key:value ...``;
   torchtune's recipe logs some values as ``tensor(...)``), drops the first ``--warmup-steps`` optimizer steps and
   computes: label tokens/s per GPU (harmonic mean of the logged per-step rates = total tokens / total time, as
   every step holds the same number of tokens), processed tokens/s per GPU (label rate × input tokens per label
   token of that variant's data), peak memory (max over the measured steps of ``peak_memory_active/alloc/
   reserved``, GiB, CUDA only), and MFU = 6 · N_params · processed tokens/s / peak FLOP/s (plus a column that
   adds the attention term 12 · layers · d · seq_len per token, PaLM's convention).
4. Prints a markdown table and writes ``--out/table.md``, ``--out/results.json`` and one console log per variant
   (``--out/<variant>.log``).

    # the GPU measurement (see benchmarks/gpu_run.sh for the device wrapper)
    python benchmarks/bench_gpu.py --device cuda --shape 1.5b --seq-len 8192 --steps 6 --out DIR
    # CPU smoke test of the whole pipeline (the torchtune recipe is skipped on CPU)
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --device cpu --shape tiny --seq-len 256 --steps 4 --out DIR

The ``tune`` CLI is run as ``python -m torchtune._cli.tune`` (the stock entry point). Where the project's ``.pth``
hook is not installed (e.g. wheels unpacked with ``pip install --target``), this script registers
``iwsft_distributed`` itself and then calls the same entry point (``python bench_gpu.py --tune-cli ...``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `import iwsft` from a checkout that is not pip-installed (the device machine)
    sys.path.insert(0, str(REPO))

H100_SXM_BF16_DENSE_TFLOPS = 989.0
MEMORY_KEYS = ("peak_memory_active", "peak_memory_alloc", "peak_memory_reserved")
TPS_KEY = "tokens_per_second_per_gpu"
SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # = iwsft.tune.datasets'

# Qwen2.5 shapes (torchtune.models.qwen2 keyword names). "tiny" = iwsft.tiny's model (kept in sync by a check below).
SHAPES: Dict[str, Dict[str, Any]] = {
    "1.5b": dict(vocab_size=151936, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536,
                 intermediate_dim=8960, max_seq_len=32768, norm_eps=1e-6, rope_base=1_000_000.0,
                 tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                 max_seq_len=4096, norm_eps=1e-6, rope_base=1_000_000.0, tie_word_embeddings=True),
}

VARIANTS = {  # name -> (recipe, overrides on top of the common ones)
    "sft": ("iwsft_distributed", {"method": "sft"}),
    "iwsft_precomputed": ("iwsft_distributed", {"method": "iwsft", "reference.strategy": "precomputed"}),
    "iwsft_model": ("iwsft_distributed", {"method": "iwsft", "reference.strategy": "model"}),
    "torchtune_full": ("full_finetune_distributed", {}),
}


# ==============================================================================================================
# pure arithmetic and parsing (unit-tested in tests/test_bench_gpu.py)


def count_params(shape: Dict[str, Any]) -> int:
    """Parameters of a Qwen2 model: q/k/v projections with bias, o-projection and SwiGLU MLP without, two RMSNorm
    scales per layer, a final norm, the embedding, and an output projection unless it is tied to the embedding."""
    d, v, f, n_layers = shape["embed_dim"], shape["vocab_size"], shape["intermediate_dim"], shape["num_layers"]
    head_dim = d // shape["num_heads"]
    kv = shape["num_kv_heads"] * head_dim
    attn = (d * d + d) + 2 * (d * kv + kv) + d * d
    mlp = 3 * d * f
    per_layer = attn + mlp + 2 * d
    out = 0 if shape["tie_word_embeddings"] else v * d
    return n_layers * per_layer + d + v * d + out


def flops_per_token(n_params: int, shape: Dict[str, Any], seq_len: float, attention: bool = False) -> float:
    """Training FLOPs per token: ``6 N`` (forward + backward of every weight), plus, with ``attention``, PaLM's
    ``12 · layers · d · seq_len`` for the score and value matmuls (no causal discount, no recompute)."""
    flops = 6.0 * n_params
    if attention:
        flops += 12.0 * shape["num_layers"] * shape["embed_dim"] * seq_len
    return flops


def mfu(tokens_per_s: float, flops_per_tok: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (``peak_tflops`` · 1e12)."""
    return tokens_per_s * flops_per_tok / (peak_tflops * 1e12)


_KEY = re.compile(r"(?:^|\s)([A-Za-z_][\w./-]*):")
_TENSOR = re.compile(r"^tensor\(\s*([^,\s)]+)")


def _value(text: str):
    """``'12.5'`` -> 12.5; ``"tensor(12.5, device='cuda:0')"`` -> 12.5; anything else stays a string."""
    text = text.strip()
    m = _TENSOR.match(text)
    try:
        return float(m.group(1) if m else text)
    except ValueError:
        return text


def parse_disk_log(text: str) -> List[Dict[str, Any]]:
    """Records of a torchtune ``DiskLogger`` file: one ``{"step": int, key: value, ...}`` per ``Step N | ...`` line.

    The logger writes ``Step {step} | `` then ``{key}:{value} `` per metric; values are printed with ``str`` and may
    contain spaces (``tensor(3.1, device='cuda:0')``), so keys are found as ``name:`` at the start or after a blank.
    """
    records = []
    for line in text.splitlines():
        m = re.match(r"^Step (\d+) \| ?(.*)$", line.strip())
        if not m:
            continue
        rec: Dict[str, Any] = {"step": int(m.group(1))}
        body = m.group(2)
        keys = list(_KEY.finditer(body))
        for i, k in enumerate(keys):
            end = keys[i + 1].start() if i + 1 < len(keys) else len(body)
            rec[k.group(1)] = _value(body[k.end():end])
        records.append(rec)
    return records


def summarize(records: List[Dict[str, Any]], warmup_steps: int, *, n_params: int, shape: Dict[str, Any],
              input_per_label: float, seq_len: float, peak_tflops: float) -> Dict[str, Any]:
    """Throughput, memory and MFU of one run from its DiskLogger records.

    Args:
        records: from :func:`parse_disk_log` (one per optimizer step).
        warmup_steps: the first steps dropped (compilation, allocator and cuDNN warm-up, first data loads).
        n_params: model parameters (the ``N`` of ``6 N``).
        shape: model shape (for the attention term).
        input_per_label: input tokens per label token of this run's data (the logged rate counts label tokens;
            the model processes every input token).
        seq_len: mean input tokens per sequence (for the attention term).
        peak_tflops: the device's dense bf16 peak, in TFLOP/s.

    Returns:
        ``steps_logged``, ``steps_measured``, ``label_tokens_per_s_per_gpu`` (harmonic mean of the measured steps'
        rates: total tokens / total time, since every step holds the same tokens), ``tokens_per_s_per_gpu``
        (processed), ``mfu``, ``mfu_with_attention``, and ``peak_memory_*`` (GiB, max over the measured steps;
        ``None`` when not logged, e.g. on CPU). Raises ``ValueError`` when no step is left after the warm-up.
    """
    steps = sorted((r for r in records if TPS_KEY in r), key=lambda r: r["step"])
    measured = steps[warmup_steps:]
    if not measured:
        raise ValueError(f"no step left to measure: {len(steps)} logged, {warmup_steps} warm-up")
    rates = [float(r[TPS_KEY]) for r in measured]
    label_tps = len(rates) / sum(1.0 / x for x in rates)
    tps = label_tps * input_per_label
    out: Dict[str, Any] = {
        "steps_logged": len(steps),
        "steps_measured": len(measured),
        "label_tokens_per_s_per_gpu": label_tps,
        "tokens_per_s_per_gpu": tps,
        "mfu": mfu(tps, flops_per_token(n_params, shape, seq_len), peak_tflops),
        "mfu_with_attention": mfu(tps, flops_per_token(n_params, shape, seq_len, attention=True), peak_tflops),
    }
    for key in MEMORY_KEYS:
        vals = [float(r[key]) for r in measured if isinstance(r.get(key), float)]
        out[key] = max(vals) if vals else None
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 1e-3 else f"{100 * x:.2g}%"


def markdown_table(rows: List[Dict[str, Any]], baseline: str = "sft") -> str:
    """One line per variant; failed or skipped variants show their reason."""
    base = next((r for r in rows if r["variant"] == baseline and r.get("tokens_per_s_per_gpu")), None)

    def gib(x):
        return "–" if x is None else f"{x:.1f}"

    lines = ["| variant | recipe | tokens/s/GPU | label tok/s/GPU | step s | step time vs sft | peak active GiB | "
             "peak alloc GiB | peak reserved GiB | MFU (6N) | MFU (6N+attn) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("tokens_per_s_per_gpu") is None:
            lines.append(f"| {r['variant']} | {r['recipe']} | {r.get('status', 'failed')}: "
                         f"{r.get('reason', '')} |||||||||")
            continue
        rel = f"{base['tokens_per_s_per_gpu'] / r['tokens_per_s_per_gpu']:.2f}×" if base else "–"
        lines.append(
            f"| {r['variant']} | {r['recipe']} | {r['tokens_per_s_per_gpu']:,.0f} | "
            f"{r['label_tokens_per_s_per_gpu']:,.0f} | {r['step_s']:.3f} | {rel} | {gib(r['peak_memory_active'])} | "
            f"{gib(r['peak_memory_alloc'])} | {gib(r['peak_memory_reserved'])} | {_pct(r['mfu'])} | "
            f"{_pct(r['mfu_with_attention'])} |")
    return "\n".join(lines) + "\n"


# ==============================================================================================================
# assets: checkpoint, tokenizer, data


def write_checkpoint(model_dir: Path, shape: Dict[str, Any], tiny_model_dir: Path, device: str, seed: int = 0) -> int:
    """Random bf16 Qwen2 weights in HF layout (``model.safetensors`` + ``config.json``) with the tiny tokenizer
    files; returns the parameter count. Weights ~ N(0, 0.02), norms 1, biases 0 (generated on ``device``)."""
    import torch
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    for f in tiny_model_dir.iterdir():  # vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, model_dir / f.name)
    d, v, f_dim = shape["embed_dim"], shape["vocab_size"], shape["intermediate_dim"]
    kv = shape["num_kv_heads"] * (d // shape["num_heads"])
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    def zeros(n):
        return torch.zeros(n, dtype=torch.bfloat16)

    sd = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": ones(d)}
    if not shape["tie_word_embeddings"]:
        sd["lm_head.weight"] = rand(v, d)
    for i in range(shape["num_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.q_proj.bias": zeros(d),
            p + "self_attn.k_proj.weight": rand(kv, d), p + "self_attn.k_proj.bias": zeros(kv),
            p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.v_proj.bias": zeros(kv),
            p + "self_attn.o_proj.weight": rand(d, d),
            p + "mlp.gate_proj.weight": rand(f_dim, d), p + "mlp.up_proj.weight": rand(f_dim, d),
            p + "mlp.down_proj.weight": rand(d, f_dim),
            p + "input_layernorm.weight": ones(d), p + "post_attention_layernorm.weight": ones(d),
        })
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.numel() for t in sd.values())

    ids = json.loads((tiny_model_dir.parent / "tiny_assets.json").read_text())["special_token_ids"]
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": v, "hidden_size": d,
        "intermediate_size": f_dim, "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"], "num_key_value_heads": shape["num_kv_heads"],
        "max_position_embeddings": shape["max_seq_len"], "rms_norm_eps": shape["norm_eps"],
        "rope_theta": shape["rope_base"], "tie_word_embeddings": shape["tie_word_embeddings"],
        "hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "torch_dtype": "bfloat16",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return n_params


# Words the tiny BPE knows well, so the (pure-Python) torchtune tokenizer is fast and the length is linear in repeats.
_FILLER = " We need to compute the value. Let me check the answer again, step by step."


def _row(i: int, repeats: int) -> Dict[str, str]:
    a, b = 500 + (37 * i) % 500, 500 + (91 * i) % 500  # 3 + 3 -> 4 digits: the same token count on every row
    return {
        "question": f"What is {a} + {b}? Give the sum as an integer.",
        "deepseek_thinking_trajectory": f"We need {a} + {b}." + _FILLER * repeats,
        "deepseek_attempt": f"The sum is $\\boxed{{{a + b}}}$.",
        "deepseek_grade": "Yes", "solution": str(a + b), "cot_type": "math", "source_type": "iwsft/bench_gpu",
    }


def _row_tokens(tokenizer, row) -> int:
    from iwsft.tune.datasets import s1_messages

    msgs = s1_messages(row["question"], row["deepseek_thinking_trajectory"], row["deepseek_attempt"])
    return len(tokenizer.tokenize_messages(msgs)[0])


def write_data(data_dir: Path, model_dir: Path, seq_len: int, num_rows: int) -> Dict[str, Any]:
    """The s1K-format JSONL and the equivalent OpenAI-messages JSONL, rows just under ``seq_len`` tokens; returns
    token statistics of both, as the two recipes' datasets tokenize them."""
    from torchtune.datasets import chat_dataset
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    from iwsft.tune.datasets import s1_assistant_text, s1k_dataset

    tok = qwen2_5_tokenizer(path=str(model_dir / "vocab.json"), merges_file=str(model_dir / "merges.txt"),
                            special_tokens_path=str(model_dir / "tokenizer.json"), max_seq_len=None)
    base, one = _row_tokens(tok, _row(0, 0)), _row_tokens(tok, _row(0, 1))
    per_repeat = _row_tokens(tok, _row(0, 2)) - one
    if per_repeat != one - base or base > seq_len:
        raise RuntimeError(f"row length is not linear in the filler or too long ({base}, {one}, +{per_repeat})")
    repeats = (seq_len - base) // per_repeat

    data_dir.mkdir(parents=True, exist_ok=True)
    s1k_path, chat_path = data_dir / "s1k_bench.jsonl", data_dir / "chat_bench.jsonl"
    with open(s1k_path, "w") as fs, open(chat_path, "w") as fc:
        for i in range(num_rows):
            row = _row(i, repeats)
            fs.write(json.dumps(row) + "\n")
            fc.write(json.dumps({"messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": s1_assistant_text(row["deepseek_thinking_trajectory"],
                                                                   row["deepseek_attempt"])},
            ]}) + "\n")

    ours = s1k_dataset(tok, source="json", data_files=str(s1k_path), max_seq_len=seq_len)
    theirs = chat_dataset(tok, source="json", data_files=str(chat_path), conversation_column="messages",
                          conversation_style="openai", train_on_input=False, split="train")
    if len(ours) != num_rows or len(theirs) != num_rows:
        raise RuntimeError(f"expected {num_rows} rows, got {len(ours)} (s1k) and {len(theirs)} (chat)")

    def stats(ds):
        n_in = n_lab = 0
        for j in range(len(ds)):
            s = ds[j]
            n_in += len(s["tokens"])
            n_lab += sum(1 for x in s["labels"] if x != -100)
        # the recipes shift labels left by one: the first token is never a target (always masked here anyway)
        return {"input_tokens": n_in, "label_tokens": n_lab, "mean_seq_len": n_in / len(ds),
                "input_per_label": n_in / n_lab}

    if any(ours[j]["tokens"] != theirs[j]["tokens"] for j in range(num_rows)):
        raise RuntimeError("the s1K and chat data sets do not give the same token sequences")
    return {"rows": num_rows, "filler_repeats": repeats, "s1k_path": str(s1k_path), "chat_path": str(chat_path),
            "iwsft": stats(ours), "torchtune": stats(theirs)}


# ==============================================================================================================
# configs and runs


def _set(cfg, dotted: str, value) -> None:
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, dotted, value, merge=False, force_add=True)


def stock_config_path(name: str = "qwen2_5/1.5B_full") -> Path:
    import torchtune
    from torchtune._recipe_registry import get_all_recipes

    for recipe in get_all_recipes():
        for c in recipe.configs:
            if c.name == name:
                return Path(torchtune.__file__).parent.parent / "recipes" / "configs" / c.file_path
    raise FileNotFoundError(f"torchtune config {name} not found")


def make_config(variant: str, args, shape_name: str, model_dir: Path, data: Dict[str, Any], run_dir: Path):
    """The YAML for one variant: the shipped/stock config plus the shared benchmark settings."""
    from omegaconf import OmegaConf

    recipe, extra = VARIANTS[variant]
    shape = SHAPES[shape_name]
    cuda = args.device == "cuda"
    if recipe == "iwsft_distributed":
        cfg = OmegaConf.load(REPO / "configs" / ("qwen_1_5b.yaml" if shape_name == "1.5b" else "tiny_cpu.yaml"))
        _set(cfg, "dataset", {"_component_": "iwsft.tune.datasets.s1k_dataset", "source": "json",
                              "data_files": data["s1k_path"], "split": "train", "max_seq_len": args.seq_len})
        _set(cfg, "loss", {"_component_": "iwsft.ChunkedWeightedNLL", "num_output_chunks": args.output_chunks})
        _set(cfg, "reference.batch_size", args.batch_size)
        _set(cfg, "warmup_ratio", None)  # the scheduler below, as for torchtune's recipe
    else:
        cfg = OmegaConf.load(stock_config_path())
        _set(cfg, "dataset", {"_component_": "torchtune.datasets.chat_dataset", "source": "json",
                              "data_files": data["chat_path"], "split": "train", "conversation_column": "messages",
                              "conversation_style": "openai", "train_on_input": False, "packed": False})
        _set(cfg, "loss", {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss",
                           "num_output_chunks": args.output_chunks})
        _set(cfg, "checkpointer.checkpoint_dir", "${checkpoint_dir}")
    if shape_name == "1.5b":
        _set(cfg, "model", {"_component_": "torchtune.models.qwen2_5.qwen2_5_1_5b_instruct"})
    else:
        _set(cfg, "model", {"_component_": "torchtune.models.qwen2.qwen2", "attn_dropout": 0.0,
                            **{k: v for k, v in shape.items()
                               if k not in ("max_seq_len",)}, "max_seq_len": max(shape["max_seq_len"], args.seq_len)})
    common = {
        "checkpoint_dir": str(model_dir), "output_dir": str(run_dir),
        "tokenizer": {"_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer",
                      "path": "${checkpoint_dir}/vocab.json", "merges_file": "${checkpoint_dir}/merges.txt",
                      "special_tokens_path": "${checkpoint_dir}/tokenizer.json", "max_seq_len": None},
        "checkpointer.checkpoint_files": ["model.safetensors"],
        "checkpointer.output_dir": "${output_dir}",
        "seed": 0, "shuffle": False, "epochs": 1, "max_steps_per_epoch": args.steps,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1.0e-5, "betas": [0.9, 0.95],
                      "weight_decay": 1.0e-4, "fused": cuda},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 0},
        "clip_grad_norm": 1.0, "compile": args.compile, "device": args.device, "dtype": args.dtype,
        "enable_activation_checkpointing": not args.no_activation_checkpointing,
        "enable_activation_offloading": False, "fsdp_cpu_offload": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": "${output_dir}/logs"},
        "log_every_n_steps": 1, "log_peak_memory_stats": cuda,
    }
    for k, v in {**common, **extra}.items():
        _set(cfg, k, v)
    return recipe, cfg


def tune_command() -> List[str]:
    """``python -m torchtune._cli.tune`` when ``iwsft_distributed`` is registered (the project is installed with
    its ``.pth`` hook), else this script's ``--tune-cli`` mode, which registers it and calls the same entry point."""
    probe = ("import torchtune._recipe_registry as r; "
             "print(any(x.name == 'iwsft_distributed' for x in r.get_all_recipes()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env())
    if out.stdout.strip().endswith("True"):
        return [sys.executable, "-m", "torchtune._cli.tune"]
    return [sys.executable, str(Path(__file__).resolve()), "--tune-cli"]


def tune_cli(argv: List[str]) -> None:
    """``tune`` with ``iwsft_distributed`` registered (REFERENCE §3, mechanism (a))."""
    import torchtune._recipe_registry as registry
    from torchtune._cli.tune import main as tune_main

    from iwsft.tune.registry import register

    register(registry)
    sys.argv = ["tune", *argv]
    tune_main()


def _env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    return env


def run_variant(variant: str, cfg_path: Path, recipe: str, run_dir: Path, log_path: Path, args, tune: List[str]):
    cmd = [*tune, "run", "--nproc_per_node", str(args.nproc), recipe, "--config", str(cfg_path)]
    env = _env()
    print(f"\n=== {variant}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                  timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    print(f"    exit {rc} after {wall:.1f}s (log: {log_path})", flush=True)
    return rc, wall


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tune-cli"]:
        tune_cli(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="1.5b")
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens per row (rows are built just under it)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (warm-up included)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="first optimizer steps left out of the numbers")
    ap.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch and process")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run: --nproc_per_node")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--output-chunks", type=int, default=16, help="loss.num_output_chunks (both recipes)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                    help="dense bf16 peak per GPU for MFU (default: H100 SXM, 989)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("--out", required=True, help="results: table.md, results.json, <variant>.log")
    ap.add_argument("--work", default=None, help="model, data, configs and run dirs (default: OUT/work)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the assets and configs and `tune validate` them, but train nothing")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's epoch_*/ checkpoint")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup_steps:
        ap.error("--steps must be larger than --warmup-steps")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")

    from omegaconf import OmegaConf

    from iwsft.tiny import MODEL_DIMS, VOCAB_SIZE, build_tiny_assets

    assert SHAPES["tiny"]["vocab_size"] == VOCAB_SIZE and all(
        SHAPES["tiny"][k] == MODEL_DIMS[k] for k in ("num_layers", "num_heads", "num_kv_heads", "embed_dim",
                                                     "intermediate_dim")), "SHAPES['tiny'] is out of sync"
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    rows = args.steps * args.batch_size * args.grad_accum * args.nproc

    t0 = time.perf_counter()
    tiny = build_tiny_assets(work / "tiny_assets")
    model_dir = work / f"model_{args.shape}"
    import torch

    n_params = write_checkpoint(model_dir, shape, Path(tiny["model_dir"]),
                                device="cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    assert n_params == count_params(shape), (n_params, count_params(shape))
    data = write_data(work / "data", model_dir, args.seq_len, rows)
    print(f"assets in {time.perf_counter() - t0:.1f}s: {args.shape} model, {n_params / 1e6:,.1f}M params; "
          f"{rows} rows of {data['iwsft']['mean_seq_len']:.0f} tokens "
          f"(labels/row: iwsft {data['iwsft']['label_tokens'] / rows:.0f}, "
          f"torchtune {data['torchtune']['label_tokens'] / rows:.0f})", flush=True)

    tune = tune_command()
    results = []
    for variant in variants:
        recipe, _ = VARIANTS[variant]
        res: Dict[str, Any] = {"variant": variant, "recipe": recipe}
        results.append(res)
        run_dir = work / "runs" / variant
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe, cfg = make_config(variant, args, args.shape, model_dir, data, run_dir)
        cfg_path = work / "configs" / f"{variant}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, cfg_path)
        log_path = out / f"{variant}.log"
        cpu_stock = recipe == "full_finetune_distributed" and args.device == "cpu"
        if cpu_stock or args.dry_run:
            # No training; still check the wiring: `tune validate` binds every _component_ to its signature.
            check = subprocess.run([*tune, "validate", str(cfg_path)], capture_output=True, text=True,
                                   env=_env())
            log_path.write_text(check.stdout + check.stderr)
            verdict = "config valid" if check.returncode == 0 else f"config INVALID (see {log_path.name})"
            why = ("torchtune 0.6.1's full_finetune_distributed does not run on CPU (unconditional "
                   "get_memory_stats and torch.cpu.empty_cache; REFERENCE §3)" if cpu_stock else "--dry-run")
            res.update(config=str(cfg_path), status="skipped" if check.returncode == 0 else "failed",
                       reason=f"{why}; tune validate: {verdict}")
            print(f"\n=== {variant}: {res['status']}: {res['reason']}", flush=True)
            continue
        rc, wall = run_variant(variant, cfg_path, recipe, run_dir, log_path, args, tune)
        res.update(config=str(cfg_path), wall_s=round(wall, 1), exit=rc)
        logs = sorted((run_dir / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
        records = parse_disk_log(logs[-1].read_text()) if logs else []
        res["records"] = records
        if not args.keep_checkpoints:
            for p in run_dir.glob("epoch_*"):
                shutil.rmtree(p, ignore_errors=True)
        if rc != 0:
            res.update(status="failed", reason=f"exit {rc}; see {log_path.name}")
            print(_tail(log_path), flush=True)
            continue
        stats = data["iwsft" if recipe == "iwsft_distributed" else "torchtune"]
        try:
            res.update(summarize(records, args.warmup_steps, n_params=n_params, shape=shape,
                                 input_per_label=stats["input_per_label"], seq_len=stats["mean_seq_len"],
                                 peak_tflops=args.peak_tflops))
        except ValueError as e:
            res.update(status="failed", reason=str(e))
            continue
        res["status"] = "ok"
        tokens_per_step = stats["input_tokens"] / args.steps / args.nproc
        res["step_s"] = tokens_per_step / res["tokens_per_s_per_gpu"]

    header = (f"{args.shape} Qwen2.5-shaped model ({n_params / 1e6:,.1f}M params, random weights), {args.dtype}, "
              f"device {args.device} x{args.nproc}, {data['iwsft']['mean_seq_len']:.0f} tokens/row, "
              f"batch {args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps "
              f"({args.warmup_steps} warm-up dropped), activation checkpointing "
              f"{'off' if args.no_activation_checkpointing else 'on'}, {args.output_chunks} output chunks; "
              f"MFU vs {args.peak_tflops:g} TFLOP/s")
    table = markdown_table(results)
    device_name = None
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    (out / "table.md").write_text(f"{header}{'; GPU: ' + device_name if device_name else ''}\n\n{table}")
    (out / "results.json").write_text(json.dumps({
        "args": vars(args), "device_name": device_name, "n_params": n_params, "shape": shape, "data": data,
        "tune_command": tune, "results": results}, indent=2, default=str) + "\n")
    print("\n" + header + "\n\n" + table)
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
