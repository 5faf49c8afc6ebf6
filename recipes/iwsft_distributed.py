# iw-SFT recipe for torchtune 0.6.1 (arXiv 2507.12856). Run by path or through the registered name:
#   tune run --nproc_per_node 8 iwsft_distributed --config qwen_32b
#   tune run iwsft_distributed --config tiny_cpu checkpoint_dir=... dataset.data_files=... output_dir=...
"""Importance-weighted SFT (iw-SFT) and plain SFT, full or LoRA, on 1..N processes (CUDA/NCCL or CPU/gloo).

The loss is ``L = -(1/B) Σ_b sg(w_b) · mean_t log p_θ(y_bt)`` over the B sequences of the global batch with
``loss.reduction: sequence`` (the authors' effective objective; the qwen configs) or
``L = -Σ_b Σ_t sg(w_b) · log p_θ(y_bt) / (label tokens in the global batch)`` with ``loss.reduction: token``
(torchtune's convention; the default of ``iwsft.ChunkedWeightedNLL`` and the tiny configs), with the per-sequence
importance weight ``w_b = clip(exp(temperature · mean_t(log q − log p_ref)), clip_min, clip_max)``. ``q`` is the
current model (the detached log-probs of the *same* training forward), ``p_ref`` the starting model. All the
weight/loss math lives in ``iwsft`` (``iwsft.token_log_probs``, ``iwsft.importance_weights``,
``iwsft.weighted_nll``); this file only wires torchtune components around it.

Features (config key → what it does):

- ``method: iwsft | sft``: iw-SFT, or the plain SFT baseline on exactly the same code path (weights ≡ 1, no
  reference log-probs are computed).
- ``quality.use: none | weight | sample`` (needs ``dataset.quality_column``, scores >= 0): quality-scored data.
  ``weight`` multiplies each sequence's loss by ``quality / mean(quality over the data set)``; ``sample`` draws
  rows with probability ∝ quality (``iwsft.QualitySampler``, with replacement, seeded per epoch). With
  ``method: sft`` this is SFT(Q); with ``method: iwsft`` it is iw-SFT(Q) (the importance weight times the quality).
- ``weighting.{level, temperature, clip_min, clip_max, normalize}`` → ``iwsft.WeightingConfig``; defaults are the
  authors' LLM settings (``sequence``, 1.0, 0, 16, false). ``level: token`` uses per-token weights (the authors'
  variant uses clip [0.2, 1.8]). ``normalize: true`` divides by the mean weight over the global micro-batch
  (all ranks).
- ``weighting.q: current | ema``: the weighting policy ``q``. ``current`` (default, the paper's LLM setting) reuses
  the detached log-probs of the training forward (no extra cost); ``ema`` keeps a frozen sharded EMA copy of the
  trained weights (``iwsft.EMA``, ``weighting.ema_decay``, default 0.9 as in the authors' control code), updated
  after every optimizer step, and runs one extra no-grad forward per micro-batch. The EMA is not checkpointed: on
  resume it restarts from the resumed weights.
- ``reference.strategy``: where ``log p_ref`` comes from.
    * ``precomputed`` (default): before the first optimizer step one no-grad pass over the whole training set
      with the starting weights; the per-token log-probs of all ranks are gathered into an
      ``iwsft.ReferenceLogProbs`` cache written atomically to ``reference.cache_path`` (default
      ``<output_dir>/reference_logprobs.pt``), keyed by ``iwsft.fingerprint`` of the dataset + tokenizer config
      and the starting checkpoint files. A cache with the same key is reused (re-runs, resume); a different key
      is recomputed. No second model in memory.
    * ``model``: a frozen, sharded copy of the starting model computes ``log p_ref`` for every micro-batch.
    * ``dataset``: the log-probs recorded in the data by ``python -m iwsft.curate`` (the model's own samples: the
      exact sampling policy, temperature/top-p included); needs ``iwsft.tune.datasets.curated_dataset``, which
      refuses a row whose tokenization differs from the recorded token ids. No precompute pass, no second model.
    * ``adapters_off``: LoRA only; the training model itself, with its adapters disabled
      (``torchtune.modules.peft.disable_adapter``), under ``no_grad``.
  ``reference.batch_size`` sets the micro-batch of the precompute pass (default ``batch_size``).
- Full or LoRA fine-tuning: LoRA is used when the instantiated model has adapter parameters
  (``get_adapter_params``): only adapters train; ``epoch_N/`` holds the merged HF weights (a plain HF model dir)
  and ``epoch_N/adapter/`` the adapter (``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT format,
  ``adapter_model.pt`` for resuming).
- ``device: cuda | cpu``: backend NCCL or gloo. On CPU no memory stats are read, no cache emptying is attempted,
  and ``fsdp_cpu_offload`` / ``enable_async_checkpointing`` / ``enable_activation_offloading`` are refused.
- FSDP2 (``training.shard_model``) when more than one process; ``fsdp_reshard_after_forward``,
  ``custom_sharded_layers``, ``fsdp_cpu_offload`` (CUDA only).
- ``enable_activation_checkpointing``: full AC per transformer layer.
- Chunked output: ``loss.num_output_chunks`` (``iwsft.ChunkedWeightedNLL``) is always passed to
  ``model.set_num_output_chunks`` (no class-name check); logits are only upcast to fp32 chunk by chunk.
- Fused output (``loss.fused: true``): ``iwsft.FusedOutputHead`` makes the output projection return the per-token
  log-probs directly (projection + log-softmax ``loss.fused_chunk_size`` label tokens at a time, recomputed in
  the backward), so the ``[tokens, vocab]`` logits never exist; same values and gradients. Used by every
  log-prob pass (training, reference precompute, ``model``/``adapters_off`` reference, EMA ``q``).
  ``loss.fused_backend: cce`` selects the cut-cross-entropy CUDA kernel (optional package).
- Exact gradient accumulation and data parallelism: each micro-batch backpropagates its weighted *sum* (of token
  terms, or of per-sequence means with ``loss.reduction: sequence``); at the optimizer step the denominator (label
  tokens, or sequences) is all-reduced and gradients are scaled by ``world_size / denominator`` (the world-size
  factor undoes FSDP2's gradient averaging), as torchtune does. ``gradient_accumulation_steps``,
  ``clip_grad_norm``.
- Never trains on nothing or on NaN: before every optimizer step one all-reduce carries the loss sums and the
  non-finite flags of every rank (importance weights, model log-probs, loss, gradient shards; the clipped grad norm
  is global already). A global step with no label token is skipped and counted (not logged as a loss of 0); a
  non-finite one stops the run (``RuntimeError``: step, sample ids, likely key; no checkpoint after it) unless
  ``skip_nonfinite_steps: N`` allows skipping (and counting) up to N of them. ``weighting.clip_max: null`` is
  refused unless ``weighting.normalize: true`` (unclipped weights overflow). ``output_dir/run_summary.json``
  counts the rows (per cause) and steps not trained on.
- ``output_dir`` is locked (``iwsft_run.lock``, ``flock`` by rank 0, names host and pid) for the run's lifetime;
  a second run into it stops at start-up; the stale lock of a dead process is taken over with a warning.
  SIGTERM (forwarded by torchrun) and SIGINT unwind the run: ``run_summary.json`` says how it ended and the lock
  is released.
- ``optimizer``, ``lr_scheduler`` (any torchtune/torch component); ``warmup_ratio`` (optional) overrides the
  scheduler's ``num_warmup_steps`` with ``ceil(warmup_ratio × total optimizer steps)``.
- Data: ``dataset`` (one dataset component whose samples carry ``sample_id``, e.g.
  ``iwsft.tune.datasets.s1k_dataset``), ``collate_fn`` (default ``iwsft.tune.collate.padded_collate_iwsft``,
  which keeps ``sample_id``/``quality``), ``batch_size``, ``shuffle``, ``DistributedSampler`` per rank.
  ``packed`` datasets are refused (torchtune's PackedDataset drops ``sample_id``).
- Logging every ``log_every_n_steps`` optimizer steps via ``metric_logger``: ``loss`` (the optimised, weighted
  loss), ``nll`` (unweighted token NLL), ``lr``, ``tokens_per_second_per_gpu`` (label tokens), ``grad_norm`` (if
  clipping), peak memory (CUDA, ``log_peak_memory_stats``) and ``iwsft.weight_stats`` (``weight_mean``,
  ``weight_std``, ``weight_min``, ``weight_max``, ``weight_ess``, ``weight_clip_hi``, ``weight_clip_lo``,
  ``log_ratio_mean``), computed over the *global* batch (all-gathered from every rank). tqdm progress bar on
  rank 0.
- Checkpoints: ``checkpointer`` (``FullModelHFCheckpointer``) writes ``<output_dir>/epoch_N/`` in HF format
  (loadable by ``transformers``/vLLM) after every epoch; intermediate epochs also write
  ``recipe_state/recipe_state.pt`` (optimizer, seed, epochs run, max_steps_per_epoch). Never half a checkpoint:
  ``epoch_N/CHECKPOINT_COMPLETE`` is removed before and written after all of that epoch's files (fsynced), and
  ``recipe_state.pt`` is replaced atomically after that marker, so it only ever names a complete epoch; an
  ``epoch_N/`` without the marker is the remains of an interrupted save. The marker records each file's size and
  sha256. LoRA (Qwen2): the PEFT adapter is rewritten without the Llama RoPE permutation torchtune applies to q/k
  ``lora_B``, so base + adapter in PEFT equals the merged ``epoch_N/``.
- ``resume_from_checkpoint: true``: continues from the last intermediate epoch in ``output_dir`` (weights or
  adapter of that epoch, optimizer, lr schedule, sampler epoch, reference cache) so the loss curve continues;
  it refuses an epoch directory without ``CHECKPOINT_COMPLETE``, a file whose size or sha256 differs from the
  marker, an unreadable ``recipe_state.pt`` or reference cache (naming the file), and a config whose
  ``RESUME_KEYS`` (data order, objective, world size) differ from the ones recorded in ``recipe_state.pt``
  (listed ``key: old → new``; ``resume_allow_config_change: true`` only warns). A fresh run recomputes an
  unreadable reference cache with a warning, and moves an earlier run's ``epoch_*/`` and ``recipe_state/`` into
  ``output_dir/previous_run_<UTC time>/``. Resuming is at epoch granularity.
- ``compile``: ``torch.compile`` of the model's layers. ``seed``, ``max_steps_per_epoch``, ``epochs``, ``dtype``
  (``bf16`` | ``fp32``).

The configuration is validated (``validate_config``: unknown keys in ``weighting``/``reference``/``quality`` with a
"did you mean", numbers given as strings) and ``checkpoint_dir`` checked before any process group or model is
created, and every error says which key to change.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import iwsft
from iwsft.reference import StaleCacheError
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.modules.peft import (
    DoRALinear,
    LoRALinear,
    disable_adapter,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
)
from torchtune.training.checkpointing._utils import FormattedCheckpointFiles
from torchtune.training.lr_schedulers import get_lr

log = utils.get_logger("INFO")

METHODS = ("iwsft", "sft")
STRATEGIES = ("precomputed", "model", "adapters_off", "dataset")
QUALITY_USES = ("none", "weight", "sample")
DEFAULT_COLLATE = "iwsft.tune.collate.padded_collate_iwsft"
CACHE_NAME = "reference_logprobs.pt"
ADAPTER_SUBDIR = "adapter"  # LoRA: epoch_N/adapter/{adapter_model.safetensors, adapter_config.json, adapter_model.pt}
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"  # written last into epoch_N/: without it the save of that epoch never finished
RECIPE_STATE = Path("recipe_state") / "recipe_state.pt"  # under output_dir, where torchtune's checkpointer reads it
LOCK_NAME = "iwsft_run.lock"  # output_dir/iwsft_run.lock: held (flock) by rank 0 for the run's lifetime
README_STOP_SECTION = "Reliability: what is refused, recomputed, skipped; stopping and resuming"  # README heading
TRAIN_CONFIG_KEY = "iwsft_training_config"  # recipe_state.pt: training_config() of the run that wrote it
SUMMARY_NAME = "run_summary.json"  # output_dir/run_summary.json: rows and steps not trained on, per cause
REDUCTIONS = ("token", "sequence")
# HF layouts without the Llama RoPE row permutation: torchtune 0.6.1 still permutes q/k lora_B for the PEFT adapter
NO_ROPE_PERMUTE_MODEL_TYPES = ("QWEN2",)
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------
# configuration


def _is_lora_cfg(cfg_model) -> bool:
    return cfg_model is not None and ("lora_attn_modules" in cfg_model or "lora_rank" in cfg_model)


# The keys the recipe reads in its own (non-`_component_`) sections. A key outside these lists is a typo that would
# otherwise be ignored silently (`weighting.temprature=2` trains at temperature 1): validate_config refuses it.
# `_component_` sections (model, loss, optimizer, ...) need no list: their keys are constructor kwargs, which fail.
RECIPE_SECTION_KEYS = {
    "weighting": ("level", "temperature", "clip_min", "clip_max", "normalize", "q", "ema_decay"),
    "reference": ("strategy", "batch_size", "cache_path"),
    "quality": ("use",),
}


def unknown_section_keys(cfg: DictConfig) -> List[str]:
    """One message per key of ``weighting``/``reference``/``quality`` the recipe does not read, with the closest
    known key (``difflib``) as a suggestion."""
    import difflib

    errors = []
    for section, known in RECIPE_SECTION_KEYS.items():
        sec = cfg.get(section, None)
        if sec is None:
            continue
        if not isinstance(sec, (DictConfig, dict)):
            errors.append(f"`{section}` must be a mapping of keys ({', '.join(known)}), got {sec!r}.")
            continue
        for key in sec.keys():
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {section}.{close[0]}?" if close else f"known keys: {', '.join(known)}."
            errors.append(f"unknown key {section}.{key}: {hint}")
    return errors


def _number(section: str, key: str, value, allow_null: bool):
    """A config number: ints, floats and numeric strings (the command line gives `inf`, `1e3` as strings).

    Raises ``ValueError`` naming ``section.key`` for anything else (booleans included)."""
    if value is None and allow_null:
        return None
    if not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    kinds = "a number or null" if allow_null else "a number"
    raise ValueError(f"{section}.{key}={value!r} must be {kinds} (e.g. {section}.{key}=16).")


def weighting_config(cfg: DictConfig) -> "iwsft.WeightingConfig":
    """``cfg.weighting`` → ``iwsft.WeightingConfig`` (missing keys take the authors' LLM defaults).

    ``clip_min``/``clip_max``/``temperature`` accept numeric strings (``weighting.clip_max=inf`` arrives as the
    string ``"inf"``); ``clip_max: inf`` means no upper clip, like ``null``. Raises ``ValueError`` naming the key.
    """
    w = cfg.get("weighting", None) or {}
    base = iwsft.WeightingConfig.llm()
    clip_max = _number("weighting", "clip_max", w.get("clip_max", base.clip_max), allow_null=True)
    return iwsft.WeightingConfig(
        level=w.get("level", base.level),
        temperature=_number("weighting", "temperature", w.get("temperature", base.temperature), allow_null=False),
        clip_min=_number("weighting", "clip_min", w.get("clip_min", base.clip_min), allow_null=True),
        clip_max=None if clip_max == math.inf else clip_max,
        normalize=bool(w.get("normalize", base.normalize)),
    )


def validate_config(cfg: DictConfig) -> None:
    """Check the config before anything expensive happens; raise ``ValueError`` listing every problem."""
    errors: List[str] = []
    for key in ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "output_dir"):
        if cfg.get(key, None) is None:
            errors.append(f"missing required key `{key}`.")
    errors += unknown_section_keys(cfg)
    method = cfg.get("method", "iwsft")
    if method not in METHODS:
        errors.append(f"method={method!r}: use one of {METHODS} (sft = same recipe with weights ≡ 1).")
    ref = cfg.get("reference", None) or {}
    strategy = ref.get("strategy", "precomputed")
    if strategy not in STRATEGIES:
        errors.append(f"reference.strategy={strategy!r}: use one of {STRATEGIES}.")
    if strategy == "adapters_off" and not _is_lora_cfg(cfg.get("model", None)):
        errors.append("reference.strategy=adapters_off needs a LoRA model (a `lora_*` model builder with "
                      "lora_attn_modules); use reference.strategy=precomputed or model for full fine-tuning.")
    if ref.get("batch_size", None) is not None and int(ref.get("batch_size")) < 1:
        errors.append("reference.batch_size must be >= 1.")
    try:
        wcfg = weighting_config(cfg)
        if method == "iwsft" and wcfg.clip_max is None and not wcfg.normalize:
            errors.append("weighting.clip_max=null (or inf) needs weighting.normalize=true: an unclipped weight "
                          "exp(temperature · log-ratio) overflows to inf (then NaN) as the model moves away from "
                          "p_ref; normalised weights are formed in log space and cannot. Set a finite "
                          "weighting.clip_max (the authors: 16) or weighting.normalize=true.")
    except (ValueError, TypeError) as exc:
        errors.append(str(exc))
    skip = cfg.get("skip_nonfinite_steps", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        errors.append(f"skip_nonfinite_steps={skip!r} must be an integer >= 0 (0: stop at the first non-finite step).")
    q = (cfg.get("weighting", None) or {}).get("q", "current")
    if q not in ("current", "ema"):
        errors.append(f"weighting.q={q!r}: use `current` (the paper's LLM setting) or `ema`.")
    decay = (cfg.get("weighting", None) or {}).get("ema_decay", 0.9)
    if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        errors.append(f"weighting.ema_decay={decay!r} must be a number in [0, 1].")
    quality_use = (cfg.get("quality", None) or {}).get("use", "none")
    if quality_use not in QUALITY_USES:
        errors.append(f"quality.use={quality_use!r}: use one of {QUALITY_USES}.")
    elif quality_use != "none":
        ds_cfg = cfg.get("dataset", None)
        if ds_cfg is None or isinstance(ds_cfg, ListConfig) or not ds_cfg.get("quality_column", None):
            errors.append(f"quality.use={quality_use} needs a quality score per row: set dataset.quality_column "
                          "to the name of a numeric column (>= 0).")
    device = str(cfg.get("device", "cuda"))
    if device not in ("cuda", "cpu"):
        errors.append(f"device={device!r}: use `cuda` or `cpu`.")
    if device == "cpu":
        for key in ("fsdp_cpu_offload", "enable_async_checkpointing", "enable_activation_offloading"):
            if cfg.get(key, False):
                errors.append(f"{key}=true does not work with device=cpu (gloo-only process group); set it to false.")
    if str(cfg.get("dtype", "bf16")) not in ("bf16", "fp32"):
        errors.append(f"dtype={cfg.get('dtype')!r}: use bf16 or fp32 (fp16 is not supported).")
    if cfg.get("enable_activation_offloading", False) and not cfg.get("enable_activation_checkpointing", False):
        errors.append("enable_activation_offloading needs enable_activation_checkpointing=true.")
    for key in ("batch_size", "gradient_accumulation_steps", "epochs"):
        val = cfg.get(key, 1)
        if not isinstance(val, int) or val < 1:
            errors.append(f"{key}={val!r} must be an integer >= 1.")
    msp = cfg.get("max_steps_per_epoch", None)
    if msp is not None and (not isinstance(msp, int) or msp < 1):
        errors.append(f"max_steps_per_epoch={msp!r} must be null or an integer >= 1.")
    wr = cfg.get("warmup_ratio", None)
    if wr is not None and not (0.0 <= float(wr) < 1.0):
        errors.append(f"warmup_ratio={wr!r} must be in [0, 1).")
    if cfg.get("enable_async_checkpointing", False) and device != "cpu":
        errors.append("enable_async_checkpointing is not supported by iwsft_distributed (checkpoints are HF "
                      "safetensors written by rank 0); set it to false.")
    if cfg.get("optimizer_in_bwd", False):
        errors.append("optimizer_in_bwd is not supported by iwsft_distributed; set optimizer_in_bwd=false.")
    if int(cfg.get("tensor_parallel_dim", 1)) != 1:
        errors.append("tensor parallelism is not supported by iwsft_distributed; set tensor_parallel_dim=1.")
    ds = cfg.get("dataset", None)
    if isinstance(ds, ListConfig):
        errors.append("`dataset` is a list: give one dataset (sample ids must be unique across the training set); "
                      "concatenate the files into one data_files list instead.")
    elif ds is not None and ds.get("packed", False):
        errors.append("dataset.packed=true is not supported: torchtune's PackedDataset drops `sample_id`, which "
                      "iw-SFT needs; set dataset.packed=false.")
    loss = cfg.get("loss", None)
    if loss is not None and loss.get("fused", False) and loss.get("fused_backend", "torch") == "cce" \
            and device == "cpu":
        errors.append("loss.fused_backend=cce is a CUDA kernel; use loss.fused_backend=torch with device=cpu.")
    if loss is not None and loss.get("fused", False) and (cfg.get("model", None) or {}).get("apply_lora_to_output",
                                                                                           False):
        errors.append("loss.fused=true does not support LoRA on the output projection: set "
                      "model.apply_lora_to_output=false or loss.fused=false.")
    if loss is not None:
        for key, default in (("fused_chunk_size", 1), ("num_output_chunks", 1)):
            value = loss.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"loss.{key}={value!r} must be an integer >= 1 (e.g. loss.{key}="
                              f"{1024 if key == 'fused_chunk_size' else 8}).")
        if loss.get("fused_backend", "torch") not in ("torch", "cce"):
            errors.append(f"loss.fused_backend={loss.get('fused_backend')!r}: use `torch` (plain PyTorch, any "
                          "device) or `cce` (cut-cross-entropy kernel, CUDA).")
    if loss is not None and not str(loss.get("_component_", "")).endswith("ChunkedWeightedNLL"):
        errors.append(f"loss._component_={loss.get('_component_')!r}: this recipe computes the loss with "
                      "iwsft.ChunkedWeightedNLL (set loss._component_: iwsft.ChunkedWeightedNLL, num_output_chunks).")
    if loss is not None and loss.get("reduction", "token") not in REDUCTIONS:
        errors.append(f"loss.reduction={loss.get('reduction')!r}: use `sequence` (each sequence's mean, then the "
                      "mean over sequences: the authors') or `token` (global token mean: torchtune's).")
    ckpt = cfg.get("checkpointer", None)
    if ckpt is not None and cfg.get("output_dir", None) is not None:
        if ckpt.get("output_dir", cfg.output_dir) != cfg.output_dir:
            errors.append("checkpointer.output_dir must equal output_dir (write `output_dir: ${output_dir}`).")
    if errors:
        raise ValueError("invalid iwsft_distributed config:\n  - " + "\n  - ".join(errors))


def check_checkpoint_dir(cfg: DictConfig) -> None:
    """The starting weights must be on disk before any process group or model is created.

    Raises ``FileNotFoundError`` naming ``checkpoint_dir`` (the configs' top-level key, which
    ``checkpointer.checkpoint_dir`` and the tokenizer paths interpolate) and how to get the files, instead of the
    checkpointer's bare ``FileNotFoundError`` for ``config.json``.
    """
    ck = cfg.get("checkpointer", None)
    if ck is None or ck.get("checkpoint_dir", None) is None:
        return
    ckpt_dir = Path(str(ck.checkpoint_dir)).expanduser()
    fix = ("set checkpoint_dir=<HF model dir> on the command line, or download the weights first, e.g. "
           f"`tune download Qwen/Qwen2.5-32B-Instruct --output-dir {ckpt_dir}` (README 'Fine-tuning LLMs with "
           "torchtune'); for the tiny CPU configs `python -m iwsft.tiny --out DIR` writes DIR/model.")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint_dir={ckpt_dir} (checkpointer.checkpoint_dir) does not exist: {fix}")
    missing = [] if (ckpt_dir / "config.json").is_file() else ["config.json"]
    files = ck.get("checkpoint_files", None)
    if isinstance(files, (ListConfig, list)):
        missing += [str(f) for f in files if not (ckpt_dir / str(f)).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint_dir={ckpt_dir} (checkpointer.checkpoint_dir) lacks {', '.join(missing)}: "
                                f"it is not a complete HF model directory; {fix}")


# Keys whose change alters the data order or the objective: a resume with any of them changed would continue a
# different run on the old one's optimizer state and sampler position, so it is refused (see check_resume_config).
RESUME_KEYS = ("method", "batch_size", "gradient_accumulation_steps", "seed", "shuffle", "dataset", "collate_fn",
               "weighting", "reference.strategy", "quality", "loss.reduction", "world_size")


def training_config(cfg: DictConfig, world_size: int) -> Dict[str, Any]:
    """The training-relevant part of the config (``RESUME_KEYS``, resolved, plain JSON-able values), recorded in
    ``recipe_state.pt`` so a resume can tell whether it continues the same run."""
    out: Dict[str, Any] = {"world_size": world_size}
    for key in RESUME_KEYS:
        if key == "world_size":
            continue
        val = OmegaConf.select(cfg, key, default=None)
        out[key] = OmegaConf.to_container(val, resolve=True) if isinstance(val, (DictConfig, ListConfig)) else val
    return out


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """``["key: old → new", ...]`` for every leaf that differs between two recorded training configs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, None), new.get(key, None)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} → {b!r}")
    return changes


def _exc_summary(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first sentence of the message"``: library errors (torch.load) can run to many lines; keep the
    first line, up to its first sentence end, and never cut inside a word (``...`` marks a cut)."""
    text = " ".join(str(exc).strip().splitlines()[:1]).strip()
    for end in (". ", "; "):
        if end in text:
            text = text[: text.index(end) + 1]
            break
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:.") + " ..."
    else:
        text = text.rstrip(".")  # the caller's sentence goes on after it
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ensure_process_env() -> None:
    """`tune run` without --nproc_per_node runs the recipe in-process with no torchrun env: fake a 1-rank world."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class OutputDirLock:
    """Exclusive lock on ``output_dir`` for a run's lifetime: ``output_dir/iwsft_run.lock``, held with ``flock``.

    The file names the holder (``{"host", "pid", "started"}``, JSON). The kernel drops the lock when the holding
    process dies, however it dies, so a lock that can be taken while the file still names a holder is stale (that
    process is gone, e.g. SIGKILL or a crash): it is taken over with a warning. A clean release empties the file
    (it is never unlinked: a waiter holding the old inode would otherwise run alongside a new one).

    Raises ``RuntimeError`` naming the holder's host and pid if another live process holds the lock.
    """

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / LOCK_NAME
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            f.close()
            raise RuntimeError(
                f"output_dir {output_dir} is in use by another run ({holder}; lock file {self.path}). Two runs "
                "writing one output_dir corrupt each other's checkpoints: wait until it ends, stop it "
                f"(kill -TERM that pid; see README '{README_STOP_SECTION}'), or choose another output_dir.") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning(f"{self.path}: taking over the stale lock of a run that is gone ({previous}).")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
        f.flush()
        os.fsync(f.fileno())
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        self._file.close()  # closing drops the flock
        self._file = None


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Streamed sha256 of a file (OpenSSL; 0.4-2 GB/s per core depending on the CPU and its load)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _sha256_many(paths: List[Path]) -> Dict[Path, str]:
    """sha256 of several files in parallel threads (hashlib releases the GIL): a 65 GB checkpoint is many shards."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1, 16))) as pool:
        return dict(zip(paths, pool.map(_sha256, paths)))


def verify_checkpoint_files(epoch_dir: Path) -> None:
    """Check every file listed in ``epoch_dir/CHECKPOINT_COMPLETE`` against its recorded size and sha256.

    Raises ``RuntimeError`` naming the first file that is missing, has another size, or another checksum.
    Markers written before checksums were recorded (``{"file": size}``) are checked for size only.
    """
    marker_path = epoch_dir / COMPLETE_MARKER
    try:
        files = json.loads(marker_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{marker_path} is unreadable ({exc}): the checkpoint cannot be verified; resume from "
                           "a copy of output_dir with an intact epoch, or start afresh (resume_from_checkpoint=false)."
                           ) from None
    fix = ("The file was damaged after the save (overwritten, truncated, disk error): restore it from a copy, or "
           "start afresh with resume_from_checkpoint=false and a new output_dir.")
    expected = {}
    for name, rec in sorted(files.items()):
        path = epoch_dir / name
        size, digest = (rec, None) if isinstance(rec, int) else (rec.get("size"), rec.get("sha256"))
        if not path.is_file():
            raise RuntimeError(f"checkpoint file {path} listed in {marker_path} is missing. {fix}")
        if path.stat().st_size != size:
            raise RuntimeError(f"checkpoint file {path} has {path.stat().st_size} bytes but {size} were saved. {fix}")
        if digest is not None:
            expected[path] = digest
    actual = _sha256_many(list(expected))
    for path, digest in expected.items():
        if actual[path] != digest:
            raise RuntimeError(f"checkpoint file {path} does not match the sha256 recorded when it was saved. {fix}")


def _peft_qk_without_rope_permutation(peft_sd: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int,
                                      head_dim: int) -> Dict[str, torch.Tensor]:
    """Undo the row permutation torchtune 0.6.1 applies to q/k ``lora_B`` in the PEFT adapter.

    ``tune_to_peft_adapter_weights`` permutes the rows of every ``q_proj``/``k_proj`` ``lora_B`` [heads·head_dim, r]
    as ``view(h, head_dim/2, 2, r).transpose(1, 2)`` (the Llama RoPE layout of Meta → HF weights). Qwen2's
    HF weights have no such permutation (``qwen2_tune_to_hf`` copies q/k as is), so for Qwen2 the adapter must not
    have it either; this applies the inverse ``view(h, 2, head_dim/2, r).transpose(1, 2)``.
    """
    out = {}
    for key, t in peft_sd.items():
        if "lora_B" in key and ("q_proj" in key or "k_proj" in key):
            h = num_heads if "q_proj" in key else num_kv_heads
            r = t.shape[-1]
            t = t.view(h, 2, head_dim // 2, r).transpose(1, 2).reshape(h * head_dim, r).contiguous()
        out[key] = t
    return out


# --------------------------------------------------------------------------------------------------------------
# recipe


class IWSFTRecipeDistributed:
    """iw-SFT / SFT recipe (full or LoRA, FSDP2); see the module docstring for every feature and its key."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        check_checkpoint_dir(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=self._device)
        _ensure_process_env()
        if not dist.is_initialized():  # CPU: gloo; CUDA: NCCL (+ gloo for CPU-offloaded FSDP state)
            backend = "gloo" if self._device.type == "cpu" else training.get_distributed_backend(
                self._device.type, offload_ops_to_cpu=bool(cfg.get("fsdp_cpu_offload", False)))
            dist.init_process_group(backend)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self._train_cfg = training_config(cfg, self.world_size)  # recorded in recipe_state.pt, checked on resume
        self._allow_config_change = bool(cfg.get("resume_allow_config_change", False))
        # One run per output_dir: rank 0 holds the lock until cleanup (or until it dies); every rank stops if it
        # cannot be taken (a broadcast, so no rank waits at a later collective).
        self._lock = None
        err = None
        if self._is_rank_zero:
            try:
                self._lock = OutputDirLock(Path(cfg.output_dir))
            except RuntimeError as exc:
                err = str(exc)
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(box[0])

        self._method = cfg.get("method", "iwsft")
        self._wcfg = weighting_config(cfg)
        self._q = (cfg.get("weighting", None) or {}).get("q", "current")
        self._ema_decay = float((cfg.get("weighting", None) or {}).get("ema_decay", 0.9))
        ref = cfg.get("reference", None) or {}
        self._strategy = ref.get("strategy", "precomputed")
        self._ref_batch_size = int(ref.get("batch_size", None) or cfg.batch_size)
        self._cache_path = Path(ref.get("cache_path", None) or Path(cfg.output_dir) / CACHE_NAME)
        self._quality_use = (cfg.get("quality", None) or {}).get("use", "none")

        self._output_dir = Path(cfg.output_dir)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = bool(cfg.get("log_peak_memory_stats", False)) and self._device.type == "cuda"
        self._resume = bool(cfg.get("resume_from_checkpoint", False))
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._skip_nonfinite = int(cfg.get("skip_nonfinite_steps", 0))
        self._model_type = str(cfg.checkpointer.get("model_type", ""))
        self.skipped = {"no_label_tokens": 0, "non_finite": 0}  # optimizer steps not taken, per cause
        self.summary_written = False  # recipe_main writes one for a run that ends by a signal or an error
        self._batch_size = cfg.batch_size
        self.seed = training.set_seed(seed=cfg.get("seed", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        ckpt_dict = self._load_checkpoint(cfg)
        self._model = self._setup_model(cfg, ckpt_dict[training.MODEL_KEY], ckpt_dict.get(training.ADAPTER_KEY))
        self._tokenizer = config.instantiate(cfg.tokenizer)

        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        if self._resume:
            training.load_from_full_optimizer_state_dict(self._model, self._optimizer, ckpt_dict[training.OPT_KEY],
                                                         self._device)
            self._restore_recipe_state(ckpt_dict)
        elif self._is_rank_zero:
            self._set_aside_previous_run(Path(cfg.checkpointer.checkpoint_dir))

        self._loss_fn = config.instantiate(cfg.get("loss", None) or {"_component_": "iwsft.ChunkedWeightedNLL"})
        self._ignore_index = getattr(self._loss_fn, "ignore_index", IGNORE_INDEX)
        self._prepare_output(self._model)

        self._dataset = config.instantiate(cfg.dataset, self._tokenizer)
        self._collate = partial(_get_component_from_path(cfg.get("collate_fn", DEFAULT_COLLATE)),
                                padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)
        self._quality_mean = None
        if self._quality_use == "sample":  # SFT(Q) / iw-SFT(Q) by sampling: rows drawn ∝ quality each epoch
            self._sampler = iwsft.QualitySampler(self._dataset.quality, num_replicas=self.world_size,
                                                 rank=self.rank, seed=self.seed)
        else:
            self._sampler = DistributedSampler(self._dataset, num_replicas=self.world_size, rank=self.rank,
                                               shuffle=cfg.get("shuffle", True), seed=self.seed, drop_last=True)
        if self._quality_use == "weight":  # loss weight quality / (mean quality of the data set): mean weight 1
            self._quality_mean = float(iwsft.quality_weights(self._dataset.quality, normalize=False).mean())
            if self._quality_mean <= 0:
                raise ValueError("quality.use=weight: every quality score is 0, so nothing would be trained on.")
        self._dataloader = DataLoader(self._dataset, batch_size=self._batch_size, sampler=self._sampler,
                                      collate_fn=self._collate, drop_last=True)

        self._steps_per_epoch = len(self._dataloader) // self._grad_accum
        if self._steps_per_epoch < 1:
            raise ValueError(f"{len(self._dataset)} samples give no optimizer step with batch_size={self._batch_size} "
                             f"× {self.world_size} processes × gradient_accumulation_steps={self._grad_accum}: "
                             "lower batch_size or gradient_accumulation_steps.")
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        self.global_step = self.epochs_run * self._steps_per_epoch
        self._lr_scheduler = self._setup_lr_scheduler(cfg)

        # Reference log-probs (iw-SFT only).
        self._ref_model = None
        self._ref_cache = None
        self._q_ema = None
        if self._method == "iwsft":
            if self._strategy == "precomputed":
                self._ref_cache = self._setup_reference_cache(cfg)
            elif self._strategy == "dataset":  # log p_ref recorded at sampling time (python -m iwsft.curate)
                if not hasattr(self._dataset, "reference_log_probs"):
                    raise ValueError("reference.strategy=dataset needs recorded log-probs: use dataset._component_: "
                                     "iwsft.tune.datasets.curated_dataset on the output of python -m iwsft.curate.")
                self._ref_cache = self._dataset.reference_log_probs()
                utils.log_rank_zero(log, f"Reference log-probs of {len(self._ref_cache)} samples read from the "
                                         "data set (reference.strategy=dataset).")
            elif self._strategy == "model":
                self._ref_model = self._setup_reference_model(cfg, ckpt_dict[training.MODEL_KEY])
            elif not self._is_lora:
                raise ValueError("reference.strategy=adapters_off: the model has no LoRA adapters.")
            if self._q == "ema":  # starts from the weights training starts from (the resumed ones when resuming)
                self._q_ema = iwsft.EMA(torch.nn.Identity(), decay=self._ema_decay)
                # EMA's deepcopy cannot copy an FSDP2-sharded module: build the copy the same way as the training
                # model and let iwsft.EMA own the update rule.
                self._q_ema.module = self._frozen_copy(cfg, ckpt_dict[training.MODEL_KEY],
                                                       ckpt_dict.get(training.ADAPTER_KEY))
                with torch.no_grad():  # start at exactly the trained weights (a fresh LoRA init draws new lora_a)
                    for p_ema, p in zip(self._q_ema.module.parameters(), self._model.parameters()):
                        p_ema.copy_(p.detach())
                utils.log_rank_zero(log, f"EMA weighting policy ready (weighting.q=ema, decay {self._ema_decay}).")
        del ckpt_dict
        dist.barrier()

    def _set_aside_previous_run(self, checkpoint_dir: Path) -> None:
        """A fresh run into an ``output_dir`` that holds an earlier run's ``epoch_*/`` and ``recipe_state.pt``
        moves them (renamed, never deleted) into ``output_dir/previous_run_<UTC time>/``: this run's epochs are
        never mixed with the earlier run's, and resuming after a crash of *this* run can never continue the other
        one. The reference cache and logs stay (the cache is keyed; a stale one is recomputed). An epoch directory
        the run's own ``checkpoint_dir`` lies in is left in place (the starting weights are read from it)."""
        start = checkpoint_dir.resolve()
        old = [p for p in sorted(self._output_dir.glob("epoch_*")) if p.is_dir()
               and not (start == p.resolve() or p.resolve() in start.parents)]
        if (self._output_dir / RECIPE_STATE).is_file():
            old.append(self._output_dir / RECIPE_STATE.parent)
        if not old:
            return
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = self._output_dir / f"previous_run_{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = self._output_dir / f"previous_run_{stamp}_{n}"
        dest.mkdir()
        for p in old:
            os.replace(p, dest / p.name)
        log.warning(f"resume_from_checkpoint=false into a used output_dir: moved the earlier run's "
                    f"{', '.join(p.name for p in old)} to {dest} (delete it when no longer needed).")

    def _resume_epoch_dir(self) -> Path:
        """Rank 0 checks the resume state and the epoch's files (sizes, sha256); every rank gets the verdict."""
        box: List[Any] = [None, None]
        if self._is_rank_zero:
            try:
                box = [self._check_resume_state(), None]
            except (FileNotFoundError, RuntimeError) as exc:
                box = [None, exc]
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def _check_resume_state(self) -> Path:
        state_path = self._output_dir / "recipe_state" / "recipe_state.pt"
        if not state_path.is_file():
            raise FileNotFoundError(f"resume_from_checkpoint=true but {state_path} does not exist: no intermediate "
                                    "epoch was saved in output_dir (set resume_from_checkpoint=false).")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False, mmap=True)
            epochs = int(state[training.EPOCHS_KEY])
        except Exception as exc:  # torch.load raises OSError/RuntimeError/UnpicklingError/EOFError on damage
            raise RuntimeError(
                f"resume state {state_path} is unreadable: the file is damaged (truncated or overwritten after it "
                f"was saved), so torch.load fails ({_exc_summary(exc)}). Restore it from a copy of output_dir, or "
                "start afresh with resume_from_checkpoint=false (the damaged file is then set aside).") from None
        recorded = state.get(TRAIN_CONFIG_KEY, None)
        changes = config_changes(recorded, self._train_cfg) if recorded is not None else []
        if recorded is None:
            log.warning(f"{state_path} was written without its run's config (an older recipe): cannot check that "
                        "this resume uses the same data order and objective.")
        elif changes and self._allow_config_change:
            log.warning("RESUMING WITH A CHANGED TRAINING CONFIG (resume_allow_config_change=true); the data order "
                        "or the objective differ from the run that wrote the state: " + "; ".join(changes))
        elif changes:
            raise RuntimeError(
                f"resume_from_checkpoint=true with a config that changes the data order or the objective of the run "
                f"that wrote {state_path}: {'; '.join(changes)}. Resume with the original values, start afresh "
                "(resume_from_checkpoint=false, ideally a new output_dir), or set resume_allow_config_change=true "
                "to continue anyway.")
        epoch_dir = self._output_dir / f"epoch_{epochs - 1}"
        if not epoch_dir.is_dir():
            raise FileNotFoundError(f"{state_path} says {state[training.EPOCHS_KEY]} epochs ran but {epoch_dir} "
                                    "is missing.")
        if not (epoch_dir / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(
                f"{epoch_dir} has no {COMPLETE_MARKER} marker: it was being (re)written when a run stopped, so its "
                f"files may be partial or from two different runs. Resume from a copy that holds a complete epoch, "
                "or start afresh with resume_from_checkpoint=false (and a new output_dir).")
        verify_checkpoint_files(epoch_dir)
        return epoch_dir

    def _load_checkpoint(self, cfg: DictConfig) -> Dict[str, Any]:
        overrides: Dict[str, Any] = {"should_load_recipe_state": self._resume}
        if self._resume:
            epoch_dir = self._resume_epoch_dir()
            if _is_lora_cfg(cfg.model):
                overrides["adapter_checkpoint"] = str(Path(epoch_dir.name) / ADAPTER_SUBDIR / "adapter_model.pt")
            else:  # full FT: the weights of that epoch, relative to output_dir
                files = sorted(p.name for p in epoch_dir.glob("model-*.safetensors")) or \
                    sorted(p.name for p in epoch_dir.glob("model-*.bin"))
                overrides["checkpoint_files"] = [str(Path(epoch_dir.name) / f) for f in files]
            utils.log_rank_zero(log, f"Resuming from {epoch_dir}")
        self._checkpointer = config.instantiate(cfg.checkpointer, **overrides)
        return self._checkpointer.load_checkpoint()

    def _restore_recipe_state(self, ckpt: Dict[str, Any]) -> None:
        try:
            self.epochs_run = int(ckpt[training.EPOCHS_KEY])
            if self.seed != ckpt[training.SEED_KEY]:
                utils.log_rank_zero(log, f"seed {self.seed} differs from the checkpoint's; using "
                                         f"{ckpt[training.SEED_KEY]}")
                self.seed = ckpt[training.SEED_KEY]
            if self.max_steps_per_epoch != ckpt[training.MAX_STEPS_KEY]:
                utils.log_rank_zero(log, "max_steps_per_epoch differs from the checkpoint's; using the checkpoint's")
                self.max_steps_per_epoch = ckpt[training.MAX_STEPS_KEY]
        except KeyError as exc:
            raise KeyError(f"recipe_state.pt lacks {exc}; was it written by iwsft_distributed?") from exc

    def _build_model(self, cfg: DictConfig, state_dict: Dict[str, Any], adapter_sd: Optional[Dict[str, Any]],
                     trainable: bool) -> torch.nn.Module:
        """Instantiate on meta, wrap (AC, FSDP2), then materialise from full state dicts (every rank mmaps)."""
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        is_lora = len(get_adapter_params(model)) > 0
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        elif is_lora:
            set_trainable_params(model, get_adapter_params(model))
        if trainable and cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        if trainable and cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        offload = bool(cfg.get("fsdp_cpu_offload", False))
        if self.world_size > 1:
            training.shard_model(
                model=model,
                shard_conditions=[partial(training.get_shard_conditions,
                                          names_to_match=cfg.get("custom_sharded_layers", None))],
                cpu_offload=offload,
                reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if isinstance(m, (LoRALinear, DoRALinear)) and not adapter_sd:
                    m.to_empty(device="cpu" if offload else self._device)
                    m.initialize_parameters()  # lora_b = 0: the starting model equals the base model
                if hasattr(m, "rope_init"):
                    m.rope_init()
        if adapter_sd:
            training.load_from_full_model_state_dict(model, adapter_sd, self._device, strict=False,
                                                     cpu_offload=offload)
        missing, unexpected = training.load_from_full_model_state_dict(
            model, state_dict, self._device, strict=not is_lora, cpu_offload=offload)
        if is_lora:
            bad = [k for k in (missing or []) if "lora_" not in k and "magnitude" not in k] + list(unexpected or [])
            if bad:
                raise RuntimeError(f"base checkpoint does not match the LoRA model: {bad[:5]}")
            for m in model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
        training.validate_no_params_on_meta_device(model)
        return model

    def _setup_model(self, cfg, state_dict, adapter_sd) -> torch.nn.Module:
        start = time.perf_counter()
        model = self._build_model(cfg, state_dict, adapter_sd, trainable=True)
        self._is_lora = len(get_adapter_params(model)) > 0
        if self._is_lora:
            self._lora_cfg = dict(rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha,
                                  modules=list(cfg.model.lora_attn_modules),
                                  mlp=bool(cfg.model.get("apply_lora_to_mlp", False)),
                                  output=bool(cfg.model.get("apply_lora_to_output", False)))
        self._act_ctx = training.get_act_offloading_ctx_manager(
            model, cfg.get("enable_activation_offloading", False))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kind = "LoRA" if self._is_lora else "full"
        utils.log_rank_zero(log, f"Model ready in {time.perf_counter() - start:.1f}s ({kind} fine-tuning, "
                                 f"{self.world_size} process(es), {n_train} trainable parameters on rank 0)")
        if self._is_rank_zero and self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        return model

    def _setup_reference_model(self, cfg: DictConfig, state_dict) -> torch.nn.Module:
        """Frozen, sharded copy of the *starting* model (the base checkpoint, even when resuming)."""
        if self._resume and not self._is_lora:  # the loaded weights are the resumed ones: reload the starting ones
            state_dict = config.instantiate(cfg.checkpointer, should_load_recipe_state=False).load_checkpoint()[
                training.MODEL_KEY]
        model = self._frozen_copy(cfg, state_dict, None)
        utils.log_rank_zero(log, "Frozen reference model ready (reference.strategy=model).")
        return model

    def _frozen_copy(self, cfg: DictConfig, state_dict, adapter_sd) -> torch.nn.Module:
        """A no-grad, sharded model built like the trained one, with storage of its own."""
        model = self._build_model(cfg, state_dict, adapter_sd, trainable=False)
        # Loading may hand both models the very same storage (no sharding: the mmapped tensors are assigned);
        # a frozen copy must not move with the trained weights, so give it its own copy of any shared tensor.
        trained = {_local(p).untyped_storage().data_ptr() for p in self._model.parameters()}
        with torch.no_grad():
            for p in model.parameters():
                loc = _local(p)
                if loc.untyped_storage().data_ptr() in trained:
                    loc.data = loc.data.clone()
        model.eval()
        self._prepare_output(model)
        return model

    def _prepare_output(self, model: torch.nn.Module) -> None:
        """Chunked logits (``loss.num_output_chunks``), or the fused log-prob head (``loss.fused: true``)."""
        if getattr(self._loss_fn, "fused", False):
            # One output call on the whole [B, T, d] hidden states; the head computes the log-probs inside that
            # call (FSDP2 gathers the output weight once per forward, as for the plain projection).
            model.set_num_output_chunks(0)
            model._iwsft_fused_head = iwsft.FusedOutputHead(
                model, chunk_size=self._loss_fn.fused_chunk_size, ignore_index=self._ignore_index,
                backend=self._loss_fn.fused_backend)
            if not getattr(self, "_fused_logged", False):
                self._fused_logged = True
                utils.log_rank_zero(log, f"fused output head on (loss.fused=true): log-probs {self._loss_fn.fused_chunk_size} label "
                         f"tokens at a time, backend {self._loss_fn.fused_backend}; no [B, T, V] logits are held")
        else:  # always chunk; torchtune only does it for a loss named CEWithChunkedOutputLoss
            model.set_num_output_chunks(self._loss_fn.num_output_chunks)

    def _token_logp(self, model: torch.nn.Module, tokens, labels, ctx=None) -> torch.Tensor:
        """Per-token log-probs ``[B, T]`` fp32 of ``labels`` under ``model`` (``ctx`` wraps the model call only)."""
        head = getattr(model, "_iwsft_fused_head", None)
        with ctx if ctx is not None else contextlib.nullcontext():
            if head is not None:
                return head.log_probs(tokens, labels)
            logits = model(tokens)
        return self._loss_fn.token_log_probs(logits, labels)

    def _setup_lr_scheduler(self, cfg: DictConfig):
        cfg_s = cfg.get("lr_scheduler", None)
        if cfg_s is None:
            return None
        total = self.total_epochs * self._steps_per_epoch
        kwargs = dict(num_training_steps=total, last_epoch=self.global_step - 1)
        if cfg.get("warmup_ratio", None) is not None:
            kwargs["num_warmup_steps"] = math.ceil(float(cfg.warmup_ratio) * total)
        return config.instantiate(cfg_s, self._optimizer, **kwargs)

    # ------------------------------------------------------------------------------- reference log-probs
    def _cache_key(self, cfg: DictConfig) -> Dict[str, Any]:
        ck = cfg.checkpointer
        files = ck.checkpoint_files
        files = OmegaConf.to_container(files, resolve=True) if not isinstance(files, str) else [files]
        if isinstance(files, dict):  # {filename_format, max_filename}
            files = FormattedCheckpointFiles.from_dict(files).build_checkpoint_filenames()
        ckpt_dir = Path(ck.checkpoint_dir).resolve()
        stats = []
        for f in files:
            st = (ckpt_dir / f).stat() if (ckpt_dir / f).exists() else None  # size + mtime: cheap, unlike hashing
            stats.append([str(f), st and st.st_size, st and st.st_mtime_ns])  # 65 GB of weights
        parts = {
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
            "checkpoint_dir": str(ckpt_dir),
            "checkpoint_files": stats,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "dtype": str(self._dtype),  # bf16 and fp32 log-probs differ: never mix them in one log-ratio
            # the tokenized samples themselves, when the dataset can hash them (iwsft.tune.datasets can)
            "samples": self._dataset.fingerprint() if hasattr(self._dataset, "fingerprint") else None,
        }
        return {"fingerprint": iwsft.fingerprint(parts), "checkpoint_dir": str(ckpt_dir)}

    def _setup_reference_cache(self, cfg: DictConfig):
        key = self._cache_key(cfg)
        cache = None
        if self._cache_path.is_file():
            try:
                cache = iwsft.ReferenceLogProbs.load(self._cache_path, key=key)
                if len(cache) < len(self._dataset):
                    utils.log_rank_zero(log, f"Reference cache {self._cache_path} is incomplete: recomputing.")
                    cache = None
            except StaleCacheError as exc:
                utils.log_rank_zero(log, f"Reference cache {self._cache_path} is stale ({exc}): recomputing.")
            except Exception as exc:  # truncated/garbage file (any type, ValueError included): torch.load names no file
                unreadable = _exc_summary(exc)
                if self._resume and not self._is_lora:
                    raise RuntimeError(
                        f"reference cache {self._cache_path} is unreadable ({unreadable}): it is damaged. Resuming "
                        "full fine-tuning needs the cache of the original run (the resumed weights are no longer the "
                        "starting model): restore that file from a copy, or use reference.strategy=model.") from None
                log.warning(f"Reference cache {self._cache_path} is unreadable ({unreadable}): it is damaged; "
                            "recomputing it.")
        # Every rank must take the same branch (recomputing is collective): reuse only if all ranks can, e.g. not
        # when output_dir is a node-local disk that only some nodes have the cache on.
        usable = torch.tensor(int(cache is not None), device=self._device)
        dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item():
            utils.log_rank_zero(log, f"Reusing reference cache {self._cache_path} ({len(cache)} samples).")
            return cache
        if self._resume and not self._is_lora:
            raise RuntimeError(f"resume_from_checkpoint=true with reference.strategy=precomputed needs the cache "
                               f"{self._cache_path} computed by the original run (the resumed weights are no longer "
                               "the starting model). Restore that file or use reference.strategy=model.")
        return self._precompute_reference(key)

    @torch.no_grad()
    def _precompute_reference(self, key: Dict[str, Any]):
        """One no-grad pass over the full training set with the starting weights, gathered across ranks."""
        start = time.perf_counter()
        sampler = DistributedSampler(self._dataset, num_replicas=self.world_size, rank=self.rank, shuffle=False,
                                     drop_last=False)  # pads with repeats: every rank runs the same number of steps
        loader = DataLoader(self._dataset, batch_size=self._ref_batch_size, sampler=sampler,
                            collate_fn=self._collate)
        local = iwsft.ReferenceLogProbs(key=key)
        ctx = disable_adapter(self._model) if self._is_lora else contextlib.nullcontext()
        with ctx:
            for batch in tqdm(loader, desc="reference log-probs", disable=not self._is_rank_zero):
                utils.batch_to_device(batch, self._device)
                ids = self._sample_ids(batch)
                labels, mask = self._shift(batch["labels"])
                logp = self._token_logp(self._model, batch["tokens"], labels)
                local.add(ids.cpu(), logp.cpu(), mask.cpu())
        shards = [None] * self.world_size
        dist.all_gather_object(shards, local)
        cache = shards[0].merge(shards[1:])
        if self._is_rank_zero:
            cache.save(self._cache_path)
        dist.barrier()
        utils.log_rank_zero(log, f"Reference log-probs of {len(cache)} samples computed in "
                                 f"{time.perf_counter() - start:.1f}s and saved to {self._cache_path}")
        return cache

    def _reference_logp(self, tokens, labels, mask, ids) -> torch.Tensor:
        if self._ref_cache is not None:
            return self._ref_cache.gather(ids.cpu(), mask.cpu()).to(self._device)
        with torch.no_grad():
            if self._ref_model is not None:
                return self._token_logp(self._ref_model, tokens, labels)
            with disable_adapter(self._model):
                return self._token_logp(self._model, tokens, labels)

    # --------------------------------------------------------------------------------------------- train
    def _shift(self, labels: torch.Tensor):
        """Labels aligned with the logits (next token), by appending an ignore column as torchtune does."""
        labels = torch.hstack((labels[..., 1:], labels.new_full((labels.shape[0], 1), self._ignore_index)))
        return labels, labels != self._ignore_index

    @staticmethod
    def _sample_ids(batch) -> torch.Tensor:
        ids = batch.get("sample_id", None)
        if ids is None or bool((ids < 0).any()):  # padded_collate_iwsft fills -1 for samples without an id
            raise KeyError("the batch has no (valid) `sample_id`: use a dataset from iwsft.tune.datasets and "
                           f"collate_fn: {DEFAULT_COLLATE} (method=iwsft with reference.strategy=precomputed), "
                           "or reference.strategy=model.")
        return ids

    def train(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        self._optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        running_loss = torch.zeros((), device=self._device)
        running_nll = torch.zeros((), device=self._device)
        num_tokens = torch.zeros((), dtype=torch.long, device=self._device)  # label tokens
        loss_denom = torch.zeros((), dtype=torch.long, device=self._device)  # label tokens or sequences (reduction)
        step_weights: List[torch.Tensor] = []
        step_logratio: List[torch.Tensor] = []
        step_ids: List[Optional[torch.Tensor]] = []  # sample ids of this step's micro-batches (CPU), for errors
        step_flags: List[torch.Tensor] = []  # per micro-batch [3] bool: non-finite weights / log-probs / loss
        iw = self._method == "iwsft"

        for epoch in range(self.epochs_run, self.total_epochs):
            self._sampler.set_epoch(epoch)
            pbar = tqdm(total=self._steps_per_epoch, disable=not self._is_rank_zero)
            for idx, batch in enumerate(self._dataloader):
                if idx // self._grad_accum >= self._steps_per_epoch:
                    break
                step_ids.append(batch.get("sample_id"))  # still on CPU: no device sync to name them later
                utils.batch_to_device(batch, self._device)
                tokens = batch["tokens"]
                labels, mask = self._shift(batch["labels"])
                token_logp = self._token_logp(self._model, tokens, labels, self._act_ctx)  # [B, T] fp32
                seq_w = tok_w = None
                if iw:
                    ids = self._sample_ids(batch) if self._ref_cache is not None else batch.get("sample_id")
                    logp_ref = self._reference_logp(tokens, labels, mask, ids)
                    if self._q_ema is None:  # q = the current model: the same forward, detached
                        logp_q = token_logp.detach()
                    else:
                        with torch.no_grad():
                            logp_q = self._token_logp(self._q_ema.module, tokens, labels)
                    w, log_ratio = iwsft.importance_weights(logp_q, logp_ref, self._wcfg, mask=mask)
                    if self._wcfg.level == "sequence":
                        seq_w = w
                        step_weights.append(w.detach())
                    else:
                        tok_w = w
                        step_weights.append(w.detach()[mask])
                    step_logratio.append(log_ratio.detach())
                if self._quality_mean is not None:  # quality-weighted: SFT(Q) (method=sft) or iw-SFT(Q)
                    q_w = batch["quality"].to(token_logp.dtype) / self._quality_mean  # [B]
                    if tok_w is not None:
                        tok_w = tok_w * q_w.unsqueeze(1)
                    else:
                        seq_w = q_w if seq_w is None else seq_w * q_w
                loss_sum, n_tok = self._loss_fn(token_logp, mask, seq_weights=seq_w, token_weights=tok_w)
                running_loss += loss_sum.detach()
                running_nll += -(token_logp.detach() * mask).sum()
                num_tokens += mask.sum()
                loss_denom += n_tok  # label tokens (reduction=token) or sequences (reduction=sequence)
                step_flags.append(_nonfinite_flags(token_logp, mask, seq_w, tok_w, loss_sum))
                loss_sum.backward()

                if (idx + 1) % self._grad_accum != 0:
                    continue
                # ---- optimizer step. One all-reduce carries every rank's sums (loss, NLL, label tokens, loss
                # denominator) and non-finite flags (weights, log-probs, loss, local gradient shards): exact
                # normalisation by the global count, and every rank takes the same branch below.
                flags = torch.stack(step_flags).any(0)
                totals = torch.cat([torch.stack([running_loss.double(), running_nll.double(), num_tokens.double(),
                                                 loss_denom.double()]),
                                    flags.double(), self._grads_nonfinite().double().view(1)])
                dist.all_reduce(totals)
                loss_tot, nll_tot, n_tok, n_den, *bad = totals.tolist()
                skip = None
                if n_tok == 0:  # no label token on any rank: zero gradients; stepping would only decay weights
                    skip = "no_label_tokens"
                elif any(bad) or not math.isfinite(loss_tot):
                    skip = "non_finite"
                grad_norm = None
                if skip is None:
                    training.scale_grads(self._model, torch.tensor(self.world_size / n_den, device=self._device))
                    if self._clip_grad_norm is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(),
                                                                   max_norm=float(self._clip_grad_norm))
                        if isinstance(grad_norm, DTensor):
                            grad_norm = grad_norm.full_tensor()
                        if not math.isfinite(float(grad_norm)):  # global already: all ranks agree
                            skip = "non_finite"
                if skip is not None:  # the step keeps its place in the lr schedule; nothing is logged as a loss
                    self._optimizer.zero_grad(set_to_none=True)
                    if skip == "non_finite":  # counted as skipped only if allowed; otherwise it stops the run
                        self._handle_nonfinite(epoch, step_ids, step_flags, bad, grad_norm)
                    else:
                        self.skipped[skip] += 1
                        utils.log_rank_zero(log, f"step {self.global_step + 1}: no label tokens in the global batch "
                                                 f"(sample ids {_ids_str(step_ids)}): step skipped, not logged.")
                else:
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
                    if self._q_ema is not None:
                        self._q_ema.update(self._model)
                self.global_step += 1
                lr = get_lr(self._optimizer)
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                pbar.update(1)
                if skip is None:
                    loss_val = loss_tot / n_den
                    stats = self._weight_stats(step_weights, step_logratio) if iw else {}
                    pbar.set_description(f"{epoch + 1}|{self.global_step}|loss {loss_val:.4f}")
                    if self.global_step % self._log_every_n_steps == 0:
                        dt = time.perf_counter() - t0
                        metrics = {"loss": loss_val, "nll": nll_tot / n_tok, "lr": lr,
                                   "tokens_per_second_per_gpu": n_tok / (dt * self.world_size),
                                   "epoch": epoch}
                        if grad_norm is not None:
                            metrics["grad_norm"] = float(grad_norm)
                        metrics.update(stats)
                        if self._log_peak_memory_stats:
                            metrics.update(training.get_memory_stats(device=self._device))
                        if self._is_rank_zero:
                            self._metric_logger.log_dict(metrics, step=self.global_step)
                running_loss.zero_()
                running_nll.zero_()
                num_tokens.zero_()
                loss_denom.zero_()
                step_weights, step_logratio, step_ids, step_flags = [], [], [], []
                t0 = time.perf_counter()
            pbar.close()
            self.epochs_run += 1
            self.save_checkpoint(epoch)
        self.write_summary("completed")

    def _grads_nonfinite(self) -> torch.Tensor:
        """0-dim bool: does any local gradient (shard) hold inf/NaN? Local only: the caller all-reduces it."""
        grads = [_local(p.grad) for p in self._model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool, device=self._device)
        return torch.stack([g.isfinite().all() for g in grads]).logical_not().any()

    def _handle_nonfinite(self, epoch: int, step_ids, step_flags, bad: List[float], grad_norm) -> None:
        """Name the step, the sample ids and the likely key; stop (``RuntimeError``) unless skips remain."""
        local = torch.stack(step_flags).cpu()  # [micro-batches, 3]
        hit = [ids for ids, f in zip(step_ids, local) if bool(f.any())] or step_ids  # grads only: all of them
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, _ids_str(hit))  # collective: every rank is in this branch
        bad_w, bad_logp, bad_loss, bad_grad = (x > 0 for x in bad)
        what = [name for name, b in (("importance weights", bad_w), ("model log-probs", bad_logp),
                                     ("loss", bad_loss), ("gradients", bad_grad)) if b]
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            what.append(f"grad norm ({float(grad_norm)})")
        if bad_logp:
            hint = ("the model itself produces inf/NaN (its weights diverged or overflowed): lower optimizer.lr, set "
                    "clip_grad_norm, or use dtype=fp32")
        elif bad_w:
            hint = ("the importance weights overflow: lower weighting.temperature or set a finite weighting.clip_max"
                    + (" (or check the dataset.quality_column values)" if self._quality_use == "weight" else ""))
        elif bad_loss:
            hint = "the weighted loss overflows: lower weighting.clip_max or weighting.temperature"
        else:
            hint = "the gradients overflow: lower optimizer.lr, set clip_grad_norm, or use dtype=fp32"
        ids = "; ".join(f"rank {r}: {g}" for r, g in enumerate(gathered))
        msg = (f"non-finite {', '.join(what) or 'loss'} at optimizer step {self.global_step + 1} (epoch {epoch}); "
               f"sample ids of the micro-batch(es): {ids}. Likely cause: {hint}.")
        if self.skipped["non_finite"] < self._skip_nonfinite:
            self.skipped["non_finite"] += 1
            utils.log_rank_zero(log, f"{msg} Step skipped ({self.skipped['non_finite']} of at most "
                                     f"skip_nonfinite_steps={self._skip_nonfinite}).")
            return
        # the step that stops the run is its stop cause, not a skipped step
        self.write_summary(f"stopped: non-finite values at optimizer step {self.global_step + 1}",
                           stop={"cause": "non_finite", "step": self.global_step + 1, "epoch": epoch,
                                 "values": what, "sample_ids": ids})
        raise RuntimeError(f"{msg} Training stopped before the optimizer step; no checkpoint was written after it "
                           "(set skip_nonfinite_steps=N to skip up to N such steps instead).")

    def write_summary(self, status: str, stop: Optional[Dict[str, Any]] = None) -> None:
        """Rank 0 writes ``output_dir/run_summary.json`` (and logs it): rows and steps not trained on, per cause,
        and ``stop`` (cause, step, ...) when the run did not complete. Safe to call at any point after the lock
        was taken (a signal may arrive during setup)."""
        self.summary_written = True
        if not self._is_rank_zero:
            return
        dataset = getattr(self, "_dataset", None)
        ds = dataset.drop_counts() if hasattr(dataset, "drop_counts") else None
        summary = {"status": status, "epochs_run": self.epochs_run, "global_step": self.global_step,
                   "steps_skipped": dict(self.skipped), "dataset_rows": ds,
                   "loss_reduction": getattr(getattr(self, "_loss_fn", None), "reduction", "token")}
        if stop is not None:
            summary["stop"] = stop
        _atomic_write(self._output_dir / SUMMARY_NAME, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        log.info(f"Run summary ({self._output_dir / SUMMARY_NAME}): {json.dumps(summary)}")

    def _weight_stats(self, weights: List[torch.Tensor], log_ratio: List[torch.Tensor]) -> Dict[str, float]:
        w, lr = torch.cat(weights).float(), torch.cat(log_ratio).float()
        if self.world_size > 1:  # global batch; token-level weights differ in length between ranks
            w, lr = _all_gather_cat(w), _all_gather_cat(lr)
        return iwsft.weight_stats(w, clip_min=self._wcfg.clip_min, clip_max=self._wcfg.clip_max, log_ratio=lr)

    # ------------------------------------------------------------------------------------- checkpointing
    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_N/`` (HF weights, LoRA adapter) and, for intermediate epochs, ``recipe_state.pt``.

        Crash-safe ordering (rank 0): drop ``epoch_N/CHECKPOINT_COMPLETE``; let the checkpointer write the weights
        and config files; move the adapter files; fsync everything and write the marker; only then replace
        ``recipe_state.pt`` atomically. A crash at any point leaves ``recipe_state.pt`` naming the previous
        complete epoch, and ``epoch_N/`` without a marker.
        """
        intermediate = epoch + 1 < self.total_epochs
        start = time.perf_counter()
        sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if self._device.type == "cpu":  # `.cpu()` of an unsharded CPU tensor is the live parameter itself, and
            sd = {k: v.clone() for k, v in sd.items()}  # merging LoRA below works in place: never touch the model
        opt_sd = (training.get_full_optimizer_state_dict(self._model, self._optimizer, self._is_rank_zero,
                                                         device=self._device) if intermediate else None)
        if self._is_rank_zero:
            epoch_dir = self._output_dir / f"epoch_{epoch}"
            (epoch_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # a rewrite is incomplete until it is marked again
            ckpt: Dict[str, Any] = {}
            if self._is_lora:
                lc = self._lora_cfg
                ckpt[training.ADAPTER_KEY] = get_adapter_state_dict(sd)
                ckpt[training.MODEL_KEY] = get_merged_lora_ckpt(sd, rank=lc["rank"], alpha=lc["alpha"])
                ckpt[training.ADAPTER_CONFIG] = {
                    "r": lc["rank"], "lora_alpha": lc["alpha"], "peft_type": "LORA",
                    "target_modules": get_lora_module_names(lc["modules"], lc["mlp"], lc["output"]),
                }
            else:
                ckpt[training.MODEL_KEY] = sd
            # intermediate_checkpoint=False: the checkpointer would write recipe_state.pt in place, before the
            # adapter files are moved and the marker exists; it is written below instead, last and atomically.
            self._checkpointer.save_checkpoint(ckpt, epoch=epoch, intermediate_checkpoint=False)
            if self._is_lora:
                self._fix_peft_adapter(epoch_dir)
                # keep epoch_N/ a plain HF model dir: transformers/vLLM would otherwise see adapter_config.json
                self._move_adapter_files(epoch)  # and try to load it as a PEFT adapter
            files = sorted(f for f in epoch_dir.rglob("*") if f.is_file() and f.name != COMPLETE_MARKER)
            for f in files:
                _fsync(f)
            # size + sha256 of every file: resume refuses a file changed after the save (verify_checkpoint_files)
            digests = _sha256_many(files)
            marker = {"epoch": epoch, "global_step": self.global_step, "intermediate": intermediate,
                      "files": {str(f.relative_to(epoch_dir)): {"size": f.stat().st_size, "sha256": digests[f]}
                                for f in files}}
            _atomic_write(epoch_dir / COMPLETE_MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=1)))
            if intermediate:
                state = {training.OPT_KEY: opt_sd, training.SEED_KEY: self.seed,
                         training.EPOCHS_KEY: self.epochs_run, training.TOTAL_EPOCHS_KEY: self.total_epochs,
                         training.MAX_STEPS_KEY: self.max_steps_per_epoch, TRAIN_CONFIG_KEY: self._train_cfg}
                _atomic_write(self._output_dir / RECIPE_STATE, lambda tmp: torch.save(state, tmp))
            log.info(f"Checkpoint for epoch {epoch} saved to {epoch_dir} in {time.perf_counter() - start:.1f}s"
                     + (f" (resume state: {self._output_dir / RECIPE_STATE})" if intermediate else ""))
        dist.barrier()

    def _fix_peft_adapter(self, epoch_dir: Path) -> None:
        """Rewrite ``adapter_model.safetensors`` without the Llama RoPE permutation for model types that lack it.

        torchtune 0.6.1 permutes q/k ``lora_B`` rows for every model type; for Qwen2 that makes
        ``base + (alpha/r)·B·A`` differ from the merged weights it saves in the same epoch (see
        :func:`_peft_qk_without_rope_permutation`).
        """
        path = epoch_dir / "adapter_model.safetensors"
        if self._model_type not in NO_ROPE_PERMUTE_MODEL_TYPES or not path.is_file():
            return
        from safetensors.torch import load_file, save_file

        cfg = json.loads((epoch_dir / "config.json").read_text())
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        fixed = _peft_qk_without_rope_permutation(load_file(str(path)), heads, kv, head_dim)
        _atomic_write(path, lambda tmp: save_file(fixed, str(tmp), metadata={"format": "pt"}))

    def _move_adapter_files(self, epoch: int) -> None:
        epoch_dir = self._output_dir / f"epoch_{epoch}"
        (epoch_dir / ADAPTER_SUBDIR).mkdir(exist_ok=True)
        for f in epoch_dir.glob("adapter_*"):
            if f.is_file():
                os.replace(f, epoch_dir / ADAPTER_SUBDIR / f.name)

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        self.release_lock()
        dist.destroy_process_group()

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _nonfinite_flags(token_logp, mask, seq_w, tok_w, loss_sum) -> torch.Tensor:
    """[3] bool for one micro-batch: non-finite weights, model log-probs (label positions), loss. No device sync."""
    zero = torch.zeros((), dtype=torch.bool, device=mask.device)
    bad_w = zero
    if seq_w is not None:
        bad_w = bad_w | ~torch.isfinite(seq_w.detach()).all()
    if tok_w is not None:
        bad_w = bad_w | ~torch.isfinite(torch.where(mask, tok_w.detach(), torch.ones_like(tok_w))).all()
    bad_logp = ~torch.isfinite(torch.where(mask, token_logp.detach(), torch.zeros_like(token_logp))).all()
    return torch.stack([bad_w, bad_logp, ~torch.isfinite(loss_sum.detach())])


def _ids_str(step_ids) -> str:
    ids = [int(i) for t in step_ids if t is not None for i in t.tolist()]
    return str(ids) if ids else "unknown (the dataset has no sample_id)"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor object that owns a parameter's local storage (the shard for an FSDP2 DTensor)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temp file beside ``path``, fsync, then ``os.replace``: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's 1-D ``t`` (lengths may differ between ranks)."""
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    padded = t.new_zeros(max(sizes))
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:k] for o, k in zip(out, sizes)])


class RunStopped(BaseException):
    """Raised in the main thread by the SIGTERM handler (torchrun forwards SIGTERM/SIGINT to its workers), so the
    run unwinds like an error: ``run_summary.json`` is written and the lock released."""


_SIGNALS_RECEIVED: List[str] = []  # names of the signals this worker got (the first one raises RunStopped)


def _note_signal(signum, frame) -> None:
    _SIGNALS_RECEIVED.append(signal.Signals(signum).name)


def _raise_run_stopped(signum, frame) -> None:
    _note_signal(signum, frame)
    if len(_SIGNALS_RECEIVED) == 1:
        raise RunStopped(_SIGNALS_RECEIVED[0])


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="IWSFTRecipeDistributed", cfg=cfg)
    # SIGTERM: unwind (summary, lock) instead of dying on the spot. Python runs the handler between bytecodes, so
    # a worker blocked in a collective handles it when the collective returns or fails (its peer got the signal
    # too); torchrun SIGKILLs workers that have not exited within its grace period.
    previous_handler = signal.signal(signal.SIGTERM, _raise_run_stopped)
    try:
        recipe = IWSFTRecipeDistributed(cfg=cfg)  # a refused lock raises here: nothing of the holder's is touched
        try:
            recipe.setup(cfg=cfg)
            recipe.train()
            recipe.cleanup()
        except BaseException as exc:  # KeyboardInterrupt (SIGINT), RunStopped (SIGTERM), errors: say how it ended
            # A signal that arrives now (e.g. after a peer's exit broke a collective first) must not interrupt
            # the summary: only note it. The signal, if any, is the cause even when an error surfaced first.
            signal.signal(signal.SIGTERM, _note_signal)
            if not recipe.summary_written:
                cause = (f"signal {_SIGNALS_RECEIVED[0]}" if _SIGNALS_RECEIVED else
                         "signal SIGINT" if isinstance(exc, KeyboardInterrupt) else f"error {_exc_summary(exc)}")
                with contextlib.suppress(Exception):
                    when = (f"after optimizer step {recipe.global_step}" if recipe.global_step else
                            "before the first optimizer step")
                    recipe.write_summary(f"stopped: {cause} {when}",
                                         stop={"cause": cause, "steps_done": recipe.global_step})
            raise
        finally:  # an error ends the run: free output_dir for the next one (a killed process frees it too: flock)
            recipe.release_lock()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(recipe_main())
