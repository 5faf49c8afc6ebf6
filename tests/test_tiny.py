"""The tiny offline assets load in transformers and in torchtune, and both stacks agree."""

import json
import os
from pathlib import Path

import pytest
import torch

from iwsft.tiny import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, build_tiny_assets, tiny_qwen2_kwargs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=0, num_rows=32)


def _tt_tokenizer(assets, **kw):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    return qwen2_5_tokenizer(path=assets["vocab"], merges_file=assets["merges"],
                             special_tokens_path=assets["tokenizer_json"], **kw)


def test_files_and_ids(assets):
    for key in ("weights", "config", "vocab", "merges", "tokenizer_json", "tokenizer_config", "data"):
        assert Path(assets[key]).is_file(), key
    assert (Path(assets["model_dir"]) / "generation_config.json").is_file()
    cfg = json.loads(Path(assets["config"]).read_text())
    kw = tiny_qwen2_kwargs()
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert (cfg["vocab_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["hidden_size"], cfg["intermediate_size"]) == (
        kw["vocab_size"], kw["num_layers"], kw["num_heads"], kw["num_kv_heads"], kw["embed_dim"],
        kw["intermediate_dim"])
    special = {t["content"]: t["id"] for t in json.loads(Path(assets["tokenizer_json"]).read_text())["added_tokens"]}
    vocab = json.loads(Path(assets["vocab"]).read_text())
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"):
        assert t in special
    # specials come right after the BPE vocabulary, everything inside the embedding table
    assert min(special.values()) == len(vocab) and max(special.values()) < cfg["vocab_size"]
    assert cfg["eos_token_id"] == special["<|im_end|>"]


def test_data_rows(assets):
    rows = [json.loads(line) for line in Path(assets["data"]).read_text().splitlines()]
    assert len(rows) == 32
    cols = {"question", "solution", "deepseek_thinking_trajectory", "deepseek_attempt", "deepseek_grade",
            "cot_type", "source_type", "quality"}
    assert all(set(r) == cols for r in rows)
    grades = [r["deepseek_grade"] for r in rows]
    assert set(grades) == {"Yes", "No"}
    assert all(isinstance(r["quality"], float) and 0 <= r["quality"] <= 1 for r in rows)
    # a question's stated operation and the "Yes" solution agree (the synthetic data is actually correct)
    for r in rows:
        a, op, b = r["question"].split("?")[0].split()[2:5]
        expect = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert r["solution"] == str(expect)
        assert (str(expect) in r["deepseek_attempt"]) == (r["deepseek_grade"] == "Yes")


def test_idempotent_and_deterministic(assets, tmp_path):
    stamp = os.stat(assets["weights"]).st_mtime_ns
    again = build_tiny_assets(assets["root"], seed=0, num_rows=32)
    assert again == assets and os.stat(assets["weights"]).st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(FileExistsError):
        build_tiny_assets(assets["root"], seed=1, num_rows=32)
    other = build_tiny_assets(tmp_path / "b", seed=0, num_rows=32)
    for key in ("weights", "vocab", "merges", "tokenizer_json", "data"):
        assert Path(other[key]).read_bytes() == Path(assets[key]).read_bytes(), key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_hf_and_torchtune_tokenizers_agree(assets):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(assets["model_dir"])
    tt = _tt_tokenizer(assets)
    texts = ["What is 12 * 7? Give the product as an integer.",
             "<|im_start|>think\nWait, let's re-check: 3'll  be\t fine.\n\n\nünï 日本語 🙂",
             "  leading spaces and trailing   "]
    for s in texts:
        ids = hf.encode(s, add_special_tokens=False)
        assert ids == tt.encode(s, add_bos=False, add_eos=False)
        assert hf.decode(ids) == s == tt.decode(ids)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert tt.eos_id == hf.eos_token_id and tt.pad_id == hf.pad_token_id


def test_chat_template(assets):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(assets["model_dir"])
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = hf.apply_chat_template(msgs, tokenize=False)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    sys_msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert hf.apply_chat_template(sys_msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads(Path(assets["tokenizer_config"]).read_text())["chat_template"] == CHAT_TEMPLATE


def test_torchtune_checkpointer_matches_hf_logits(assets, tmp_path):
    from torchtune.models.qwen2 import qwen2
    from torchtune.training import FullModelHFCheckpointer
    from transformers import AutoModelForCausalLM

    ckpt = FullModelHFCheckpointer(checkpoint_dir=assets["checkpoint_dir"],
                                   checkpoint_files=[assets["checkpoint_files"]],
                                   model_type="QWEN2", output_dir=str(tmp_path / "out"))
    sd = ckpt.load_checkpoint()["model"]
    tt_model = qwen2(**tiny_qwen2_kwargs(max_seq_len=256))
    tt_model.load_state_dict(sd, strict=True)
    tt_model.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(assets["model_dir"], dtype=torch.float32).eval()

    tok = _tt_tokenizer(assets)
    ids = tok.encode("<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7", add_bos=False,
                     add_eos=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.stack([torch.tensor(ids), torch.randint(0, 512, (len(ids),), generator=g)])
    with torch.no_grad():
        a = tt_model(tokens)
        b = hf_model(input_ids=tokens).logits
    assert a.shape == b.shape == (2, len(ids), 512)
    # the check is meaningful only if the logits actually vary with the input
    assert (a[0] - a[1]).abs().max() > 1e-2
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_cli(tmp_path, capsys):
    from iwsft.tiny import main

    assert main(["--out", str(tmp_path / "c"), "--num-rows", "4"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert len(Path(paths["data"]).read_text().splitlines()) == 4
