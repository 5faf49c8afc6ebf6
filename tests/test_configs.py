"""Every shipped config loads, passes the recipe's validation and instantiates what needs no weights.

Model builders are instantiated on the meta device (no memory, even for 32B); tokenizers only where their files
exist (the tiny ones). Invalid settings must fail in ``validate_config`` with a message naming the key.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXPECTED = {"tiny_cpu", "tiny_cpu_lora", "qwen_32b", "qwen_32b_lora", "qwen_7b", "qwen_7b_lora", "qwen_1_5b",
            "qwen_1_5b_lora"}


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("_iwsft_recipe_under_test", REPO / "recipes" / "iwsft_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(name):
    return OmegaConf.load(REPO / "configs" / f"{name}.yaml")


def test_all_expected_configs_are_shipped():
    assert EXPECTED <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_instantiates_without_weights(path, recipe):
    from torchtune import config as tt_config
    from torchtune.config._utils import _get_component_from_path
    from torchtune.modules.peft import get_adapter_params

    cfg = OmegaConf.load(path)
    header = path.read_text().splitlines()[:12]
    assert any("tune run" in line and path.stem in line for line in header), "header must give the exact command"
    recipe.validate_config(cfg)
    wcfg = recipe.weighting_config(cfg)
    assert (wcfg.level, wcfg.temperature, wcfg.clip_min, wcfg.clip_max, wcfg.normalize) == \
        ("sequence", 1.0, 0.0, 16.0, False)  # the authors' LLM settings everywhere
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    assert hasattr(model, "set_num_output_chunks")
    is_lora = len(get_adapter_params(model)) > 0
    assert is_lora == path.stem.endswith("_lora")
    loss = tt_config.instantiate(cfg.loss)
    assert loss.num_output_chunks >= 1
    for key in ("dataset", "optimizer", "lr_scheduler", "checkpointer", "metric_logger", "tokenizer"):
        assert callable(_get_component_from_path(cfg[key]._component_)), key
    assert callable(_get_component_from_path(cfg.collate_fn))
    assert cfg.checkpointer.output_dir == cfg.output_dir
    if path.stem.startswith("qwen_"):  # the authors' hyperparameters
        assert cfg.epochs == 5 and cfg.optimizer.lr in (1e-5, 1e-4) and list(cfg.optimizer.betas) == [0.9, 0.95]
        assert cfg.optimizer.weight_decay == 1e-4 and cfg.warmup_ratio == 0.05 and cfg.dtype == "bf16"
        assert cfg.dataset.max_seq_len == 22000 and cfg.enable_activation_checkpointing
        command = next(ln for ln in header if "tune run" in ln and f"--config {path.stem} " in ln + " ")
        procs = int(command.split("--nproc_per_node")[1].split()[0]) if "--nproc_per_node" in command else 1
        assert cfg.batch_size * procs * cfg.gradient_accumulation_steps == 8, "global batch must be 8"


def test_tiny_tokenizer_instantiates(tmp_path):
    from iwsft.tiny import build_tiny_assets
    from torchtune import config as tt_config

    assets = build_tiny_assets(tmp_path / "tiny")
    for name in ("tiny_cpu", "tiny_cpu_lora"):
        cfg = load(name)
        cfg.checkpoint_dir = assets["checkpoint_dir"]
        tok = tt_config.instantiate(cfg.tokenizer)
        assert max(tok.encode("What is 2 + 3?")) < cfg.model.vocab_size


@pytest.mark.parametrize("override, message", [
    ("method=dpo", "method="),
    ("reference.strategy=adapters_off", "needs a LoRA model"),
    ("reference.strategy=magic", "reference.strategy="),
    ("fsdp_cpu_offload=true", "fsdp_cpu_offload=true does not work with device=cpu"),
    ("enable_async_checkpointing=true", "enable_async_checkpointing"),
    ("weighting.level=episode", "weighting.level"),
    ("weighting.clip_min=20", "clip_min"),
    ("weighting.q=lagged", "weighting.q"),
    ("weighting.ema_decay=2", "weighting.ema_decay"),
    ("dataset.packed=true", "PackedDataset drops `sample_id`"),
    ("loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss", "iwsft.ChunkedWeightedNLL"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
    ("dtype=fp16", "dtype="),
    ("optimizer_in_bwd=true", "optimizer_in_bwd"),
    ("quality.use=weight", "set dataset.quality_column"),
    ("quality.use=often", "quality.use="),
    ("loss.fused_chunk_size=abc", "loss.fused_chunk_size='abc' must be an integer >= 1"),
    ("loss.fused_chunk_size=0", "loss.fused_chunk_size=0 must be an integer >= 1"),
    ("loss.num_output_chunks=-2", "loss.num_output_chunks=-2 must be an integer >= 1"),
    ("loss.fused_backend=triton", "loss.fused_backend='triton'"),
])
def test_invalid_settings_fail_early_with_the_key_named(recipe, override, message):
    cfg = OmegaConf.merge(load("tiny_cpu"), OmegaConf.from_dotlist([override]))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe.validate_config(cfg)


def test_adapters_off_is_accepted_for_lora(recipe):
    cfg = OmegaConf.merge(load("tiny_cpu_lora"), OmegaConf.from_dotlist(["reference.strategy=adapters_off"]))
    recipe.validate_config(cfg)


def test_precomputed_reference_refuses_samples_without_an_id(recipe):
    import torch

    ok = recipe.IWSFTRecipeDistributed._sample_ids({"sample_id": torch.tensor([3, 0])})
    assert ok.tolist() == [3, 0]
    for batch in ({}, {"sample_id": torch.tensor([3, -1])}):  # padded_collate_iwsft fills -1 for a missing id
        with pytest.raises(KeyError, match="sample_id"):
            recipe.IWSFTRecipeDistributed._sample_ids(batch)
