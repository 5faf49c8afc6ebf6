"""The PEFT adapter of a LoRA run reproduces the merged model it was saved with, and PEFT imports here.

Oracle: PEFT itself (``PeftModel.from_pretrained`` on top of the base model in transformers) against the merged
HF checkpoint of the same epoch, both fp32. torchtune 0.6.1 applies the Llama RoPE row permutation to q/k
``lora_B`` for every model type; Qwen2 has none, so without the recipe's fix the q/k update lands on the wrong rows.
"""

from __future__ import annotations

import json

import pytest
import torch

from test_recipe import run_recipe, tiny_assets  # noqa: F401  (fixture)


def test_peft_saves_and_loads_a_lora_adapter_with_the_pinned_torchao(tmp_path):
    """peft 0.19+ raises ImportError ("only versions above 0.16.0") as soon as it builds a LoRA layer next to
    torchao 0.15.0, which torchtune 0.6.1 needs; the constraint keeps peft at 0.18.x."""
    import torchao
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert torchao.__version__.startswith("0.15.")
    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Qwen2ForCausalLM(cfg), str(tmp_path))
    assert any("lora_A" in name for name, _ in loaded.named_parameters())


@pytest.mark.slow
def test_lora_adapter_loaded_with_peft_reproduces_the_merged_checkpoint(tiny_assets, tmp_path):  # noqa: F811
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_recipe(tiny_assets, out, "epochs=1", "max_steps_per_epoch=2", "optimizer.lr=1.0e-2", config="tiny_cpu_lora")
    epoch = out / "epoch_0"
    adapter_dir = epoch / "adapter"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert {"q_proj", "k_proj"} <= set(cfg["target_modules"])

    def model(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    ids = torch.randint(0, 482, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = model(epoch)(ids).logits
        base = model(tiny_assets["checkpoint_dir"])
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(ids).logits
    assert (merged - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    assert (peft_logits - merged).abs().max() <= 1e-4

    # the q/k update itself: base + (alpha / r) · B · A equals the merged weight (what the permutation broke)
    ad = load_file(str(adapter_dir / "adapter_model.safetensors"))
    w_base = load_file(str(tiny_assets["weights"]))
    w_merged = load_file(str(epoch / "model-00001-of-00001.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    for proj in ("q_proj", "k_proj"):
        key = f"model.layers.0.self_attn.{proj}"
        delta = scale * ad[f"base_model.model.{key}.lora_B.weight"] @ ad[f"base_model.model.{key}.lora_A.weight"]
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(w_base[f"{key}.weight"] + delta, w_merged[f"{key}.weight"], rtol=0, atol=1e-6)
