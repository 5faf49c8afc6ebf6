"""Step time of recipes/iwsft_distributed.py: ``method=sft`` vs iw-SFT with the ``precomputed`` and ``model``
reference, side by side in one process on CPU (1 process, gloo).

A small random Qwen2-shaped model (default 4 layers, d=256, 8 heads / 4 KV heads, MLP 768, the tiny 512-token
vocabulary) is written in HF format next to the tiny tokenizer and s1K-style data of ``iwsft.tiny``. Each variant
builds the recipe from ``configs/tiny_cpu.yaml`` with these overrides, runs ``setup()`` and then ``train()`` for
``--steps`` optimizer steps (checkpoint saving is skipped), ``--repeats`` times, variants interleaved; the reported
step time is the best repeat's ``train()`` time / steps. The precomputed strategy's one-off pass (inside
``setup()``) is reported separately: it is paid once per run, not per step.

    OMP_NUM_THREADS=1 python benchmarks/bench_recipe.py [--steps 8 --repeats 2 --batch 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def load_recipe_module():
    spec = importlib.util.spec_from_file_location("_iwsft_recipe_bench", REPO / "recipes" / "iwsft_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_model_dir(tiny_model_dir: Path, out: Path, layers: int, dim: int, heads: int, kv_heads: int, inter: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=inter, layer_types=["full_attention"] * layers)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    model.save_pretrained(str(out), safe_serialization=True)
    return dict(layers=layers, dim=dim, heads=heads, kv_heads=kv_heads, inter=inter)


def make_cfg(model_dir: Path, data: str, out_dir: Path, dims: dict, args, **extra):
    cfg = OmegaConf.load(REPO / "configs" / "tiny_cpu.yaml")
    over = {
        "checkpoint_dir": str(model_dir), "output_dir": str(out_dir), "dataset.data_files": data,
        "model.num_layers": dims["layers"], "model.embed_dim": dims["dim"], "model.num_heads": dims["heads"],
        "model.num_kv_heads": dims["kv_heads"], "model.intermediate_dim": dims["inter"],
        "epochs": 1, "max_steps_per_epoch": args.steps, "batch_size": args.batch, "gradient_accumulation_steps": 1,
        "enable_activation_checkpointing": False, "shuffle": False,
        "metric_logger._component_": "torchtune.training.metric_logging.DiskLogger",
    }
    over.update(extra)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))
    OmegaConf.resolve(cfg)
    return cfg


def run_variant(mod, cfg):
    recipe = mod.IWSFTRecipeDistributed(cfg)
    pre = {"t": 0.0}
    orig = recipe._precompute_reference

    def timed(key):  # time the one-off reference pass separately from the training steps
        t0 = time.perf_counter()
        out = orig(key)
        pre["t"] = time.perf_counter() - t0
        return out

    recipe._precompute_reference = timed
    recipe.save_checkpoint = lambda epoch: None  # measure training steps only
    recipe.setup(cfg)
    t0 = time.perf_counter()
    recipe.train()
    train_s = time.perf_counter() - t0
    if recipe._is_rank_zero:
        recipe._metric_logger.close()
    return train_s / recipe._steps_per_epoch, pre["t"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args(argv)

    from iwsft.tiny import build_tiny_assets

    mod = load_recipe_module()
    work = Path(tempfile.mkdtemp(prefix="iwsft_bench_recipe_"))
    try:
        assets = build_tiny_assets(work / "tiny", num_rows=max(32, args.steps * args.batch))
        model_dir = work / "model"
        dims = build_model_dir(Path(assets["model_dir"]), model_dir, args.layers, args.dim, heads=8, kv_heads=4,
                               inter=3 * args.dim)
        variants = {
            "sft": {"method": "sft"},
            "iwsft precomputed": {"method": "iwsft", "reference.strategy": "precomputed"},
            "iwsft model": {"method": "iwsft", "reference.strategy": "model"},
        }
        step = {k: [] for k in variants}
        pre = []
        for r in range(args.repeats):
            names = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in names:
                cfg = make_cfg(model_dir, assets["data"], work / f"run_{r}_{name.replace(' ', '_')}", dims, args,
                               **variants[name])
                s, p = run_variant(mod, cfg)
                step[name].append(s)
                if name == "iwsft precomputed":
                    pre.append(p)
        best = {k: min(v) for k, v in step.items()}
        print(f"\nmodel: {args.layers} layers, d={args.dim}, vocab 512; batch {args.batch}; {args.steps} steps; "
              f"threads={torch.get_num_threads()}; best of {args.repeats}")
        print(f"{'variant':<20}{'step ms':>10}{'vs sft':>9}")
        for k in variants:
            print(f"{k:<20}{best[k] * 1e3:>10.1f}{best[k] / best['sft']:>8.3f}x")
        print(f"precomputed reference pass (once per run, "
              f"{max(32, args.steps * args.batch)} samples): {min(pre):.2f}s = {min(pre) / best['sft']:.1f} SFT steps")
        print(f"targets: precomputed <= 1.05x, model <= 1.40x")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
