"""Tiny, fully offline Qwen2-architecture assets for tests and the CPU demo.

``build_tiny_assets(out_dir, seed=0, num_rows=32)`` writes, deterministically from ``seed`` and without any network:

- ``model/``: a random ``transformers.Qwen2ForCausalLM`` (2 layers, hidden 64, 4 query heads, 2 key/value heads,
  MLP 128, vocab 512, tied embeddings as in the small Qwen2.5 models) saved with ``save_pretrained``
  (``config.json``, ``model.safetensors``, ``generation_config.json``), plus a Qwen-style byte-level BPE tokenizer
  (``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json`` with the Qwen2.5 ChatML chat
  template and its default system prompt). It loads with ``transformers.AutoModelForCausalLM`` /
  ``AutoTokenizer``, with torchtune's ``FullModelHFCheckpointer`` (``model_type: QWEN2``) into
  ``torchtune.models.qwen2.qwen2(**tiny_qwen2_kwargs())``, and with ``torchtune.models.qwen2_5.qwen2_5_tokenizer(
  path=vocab.json, merges_file=merges.txt, special_tokens_path=tokenizer.json)``.
- ``data/s1k_tiny.jsonl``: ``num_rows`` synthetic arithmetic problems in the s1K-1.1 column layout (``question``,
  ``solution``, ``deepseek_thinking_trajectory``, ``deepseek_attempt``, ``deepseek_grade`` Yes/No, ``cot_type``,
  ``source_type``) plus a numeric ``quality`` column in [0, 1].

Token ids: 0..N-1 are the byte-level BPE vocabulary (256 byte symbols + merges, N <= 490), then the 22 Qwen2.5
special tokens in Qwen's order (``<|endoftext|>`` first, ``<|im_start|>``, ``<|im_end|>``, ..., ``<tool_call>``,
``</tool_call>``, ...), all below the model's ``vocab_size`` = 512 (the rest are unused rows, as in real Qwen).

The build is idempotent: a complete directory (marked by ``tiny_assets.json`` with matching parameters) is reused;
otherwise everything is written into a temporary sibling directory that is renamed into place at the end, so an
interrupted build never leaves a half-written ``out_dir``.

CLI: ``python -m iwsft.tiny --out DIR [--seed 0] [--num-rows 32] [--overwrite]`` prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

# Bump when the produced files change, so an old directory is not silently reused.
ASSETS_VERSION = 1
MARKER = "tiny_assets.json"

VOCAB_SIZE = 512
BPE_VOCAB_SIZE = 490  # byte alphabet + merges; specials follow, everything stays < VOCAB_SIZE
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2's pre-tokenizer split pattern (same as tokenizer.json of Qwen2/2.5 and torchtune's PRETOKENIZE_REGEX).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's added tokens, in Qwen's id order. torchtune's Qwen2_5Tokenizer requires <tool_call>/</tool_call>.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Tokens Qwen marks as "special" (skipped by decode(skip_special_tokens=True)); the tool/fim ones are not.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

# Qwen2.5-Instruct's ChatML template without the tool-calling branches: default system prompt when the
# conversation has none, every turn as "<|im_start|>{role}\n{content}<|im_end|>\n", optional generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_DIMS = dict(
    num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
    max_seq_len=4096, norm_eps=1e-6, rope_base=1_000_000.0,
)

S1K_COLUMNS = ["question", "solution", "deepseek_thinking_trajectory", "deepseek_attempt", "deepseek_grade",
               "cot_type", "source_type", "quality"]


def tiny_qwen2_kwargs(max_seq_len: int = MODEL_DIMS["max_seq_len"]) -> Dict[str, Any]:
    """Keyword arguments for ``torchtune.models.qwen2.qwen2`` matching the tiny HF model's ``config.json``.

    ``head_dim = embed_dim / num_heads = 16``; attention is GQA with 2 query heads per key/value head.
    """
    return dict(
        vocab_size=VOCAB_SIZE,
        num_layers=MODEL_DIMS["num_layers"],
        num_heads=MODEL_DIMS["num_heads"],
        num_kv_heads=MODEL_DIMS["num_kv_heads"],
        embed_dim=MODEL_DIMS["embed_dim"],
        intermediate_dim=MODEL_DIMS["intermediate_dim"],
        max_seq_len=max_seq_len,
        attn_dropout=0.0,
        norm_eps=MODEL_DIMS["norm_eps"],
        rope_base=MODEL_DIMS["rope_base"],
        tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# synthetic data


def _arith_problem(rng: random.Random) -> Dict[str, Any]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    op = rng.choice(["+", "-", "*"])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    word = {"+": "sum", "-": "difference", "*": "product"}[op]
    question = f"What is {a} {op} {b}? Give the {word} as an integer."
    thinking = (
        f"We need {a} {op} {b}. "
        + (f"Start from {a} and add {b}: {value}." if op == "+" else
           f"Start from {a} and take away {b}: {value}." if op == "-" else
           f"{a} times {b} is {value}.")
        + f" Check: the {word} is {value}."
    )
    return {"a": a, "b": b, "op": op, "value": value, "question": question, "thinking": thinking}


def _tiny_rows(seed: int, num_rows: int) -> List[Dict[str, Any]]:
    """``num_rows`` s1K-1.1-style rows; about a quarter are graded "No" with a wrong attempt."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        p = _arith_problem(rng)
        correct = rng.random() >= 0.25
        given = p["value"] if correct else p["value"] + rng.choice([-2, -1, 1, 2, 10])
        # Some attempts already contain "Answer:" (s1's formatter must then not prepend another one).
        if rng.random() < 0.3:
            attempt = f"The result is {given}.\nAnswer: {given}"
        else:
            attempt = f"The {'sum' if p['op'] == '+' else 'result'} is $\\boxed{{{given}}}$."
        thinking = p["thinking"] if correct else p["thinking"].replace(f"is {p['value']}.", f"is {given}.")
        rows.append({
            "question": p["question"],
            "solution": str(p["value"]),
            # Leading/trailing whitespace on purpose: the s1 format strips the thinking trace.
            "deepseek_thinking_trajectory": ("\n" if i % 5 == 0 else "") + thinking + "\n",
            "deepseek_attempt": attempt,
            "deepseek_grade": "Yes" if correct else "No",
            "cot_type": "math",
            "source_type": "iwsft/tiny_arithmetic",
            "quality": round(rng.uniform(0.5, 1.0) if correct else rng.uniform(0.0, 0.5), 4),
        })
    return rows


def _tokenizer_corpus() -> Iterator[str]:
    """Fixed training text for the BPE: chat scaffolding, the s1 format words and arithmetic like the dataset's."""
    scaffold = [
        "system\n" + DEFAULT_SYSTEM_PROMPT, "user\n", "assistant\n", "think\n", "answer\n", "Answer: ",
        "The result is", "The sum is", "$\\boxed{42}$", "Give the sum as an integer.",
        "Give the difference as an integer.", "Give the product as an integer.",
        "We need to compute the value. Let me check the answer again, step by step.",
        "Hello! How can I help you today? Please reason step by step, and put your final answer within \\boxed{}.",
        "The quick brown fox jumps over the lazy dog. Wait, let me verify this carefully.",
    ]
    rng = random.Random(1234)
    for _ in range(40):
        yield from scaffold
    for _ in range(1500):
        p = _arith_problem(rng)
        yield p["question"]
        yield p["thinking"]
        yield f"Answer: {p['value']}"


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()  # Qwen2 and torchtune both NFC-normalise before splitting
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        # Every byte is a base symbol, so no text is ever out of vocabulary (no unk token needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    if tok.get_vocab_size() + len(SPECIAL_TOKENS) > VOCAB_SIZE:
        raise RuntimeError("tiny tokenizer vocabulary does not fit the model's vocab_size")
    from tokenizers import AddedToken

    tok.add_special_tokens([
        AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=t not in _NOT_SPECIAL)
        for t in SPECIAL_TOKENS
    ])
    return tok


def _write_tokenizer(tok, model_dir: Path) -> Dict[str, int]:
    """Writes vocab.json, merges.txt, tokenizer.json, tokenizer_config.json; returns the special-token ids."""
    tok.save(str(model_dir / "tokenizer.json"))
    tok.model.save(str(model_dir))  # vocab.json + merges.txt (with a "#version" header torchtune skips)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": t not in _NOT_SPECIAL}
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_DIMS["max_seq_len"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# model


def _write_model(model_dir: Path, seed: int, ids: Dict[str, int]) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=MODEL_DIMS["embed_dim"],
        intermediate_size=MODEL_DIMS["intermediate_dim"],
        num_hidden_layers=MODEL_DIMS["num_layers"],
        num_attention_heads=MODEL_DIMS["num_heads"],
        num_key_value_heads=MODEL_DIMS["num_kv_heads"],
        max_position_embeddings=MODEL_DIMS["max_seq_len"],
        rms_norm_eps=MODEL_DIMS["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": MODEL_DIMS["rope_base"]},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        attention_dropout=0.0,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )
    # Seeded, CPU-only, single-threaded-safe init: identical weights for the same seed on any machine.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(str(model_dir), safe_serialization=True)
    # Older torchtune/vLLM readers look for a top-level rope_theta; transformers 5 writes rope_parameters.
    cfg_path = model_dir / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json.setdefault("rope_theta", MODEL_DIMS["rope_base"])
    cfg_json.setdefault("torch_dtype", "float32")
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# assembly


def _paths(root: Path) -> Dict[str, str]:
    model = root / "model"
    return {
        "root": str(root),
        "model_dir": str(model),
        "checkpoint_dir": str(model),
        "checkpoint_files": "model.safetensors",
        "weights": str(model / "model.safetensors"),
        "config": str(model / "config.json"),
        "vocab": str(model / "vocab.json"),
        "merges": str(model / "merges.txt"),
        "tokenizer_json": str(model / "tokenizer.json"),
        "tokenizer_config": str(model / "tokenizer_config.json"),
        "data": str(root / "data" / "s1k_tiny.jsonl"),
    }


def _params(seed: int, num_rows: int) -> Dict[str, Any]:
    return {"version": ASSETS_VERSION, "seed": int(seed), "num_rows": int(num_rows)}


def _is_complete(root: Path, params: Dict[str, Any]) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return stored.get("params") == params and all(
        Path(p).exists() for k, p in _paths(root).items() if k != "checkpoint_files"
    )


def build_tiny_assets(out_dir, seed: int = 0, num_rows: int = 32, overwrite: bool = False) -> Dict[str, str]:
    """Builds (or reuses) the tiny model, tokenizer and s1K-style dataset under ``out_dir``.

    Args:
        out_dir: target directory; created atomically (temp sibling + rename).
        seed: seeds the model weights and the dataset rows (the tokenizer is fixed).
        num_rows: number of dataset rows.
        overwrite: replace an existing directory that is incomplete or was built with other parameters
            (without it such a directory raises ``FileExistsError``).

    Returns:
        dict of absolute paths (str): ``root``, ``model_dir`` (= ``checkpoint_dir``: HF model + tokenizer),
        ``checkpoint_files`` (file name, relative to ``checkpoint_dir``), ``weights``, ``config``, ``vocab``,
        ``merges``, ``tokenizer_json``, ``tokenizer_config``, ``data`` (JSONL).
    """
    root = Path(out_dir).expanduser().resolve()
    params = _params(seed, num_rows)
    if _is_complete(root, params):
        return _paths(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} exists but is not a complete tiny-asset directory for {params}; "
                "pass overwrite=True (--overwrite) or choose another directory"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final directory should be an ordinary one
    try:
        model_dir = tmp / "model"
        data_dir = tmp / "data"
        model_dir.mkdir()
        data_dir.mkdir()
        ids = _write_tokenizer(_train_tokenizer(), model_dir)
        _write_model(model_dir, seed, ids)
        with open(data_dir / "s1k_tiny.jsonl", "w", encoding="utf-8") as f:
            for row in _tiny_rows(seed, num_rows):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        # The marker is written last inside the temp dir: its presence means the directory is complete.
        (tmp / MARKER).write_text(json.dumps({"params": params, "special_token_ids": ids}, indent=2) + "\n")
        if root.exists():
            if _is_complete(root, params):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return _paths(root)
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # Lost a race with a concurrent builder: use its (complete) result.
            if _is_complete(root, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return _paths(root)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(root)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iwsft.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-rows", type=int, default=32)
    parser.add_argument("--overwrite", action="store_true", help="replace an incomplete or different directory")
    args = parser.parse_args(argv)
    paths = build_tiny_assets(args.out, seed=args.seed, num_rows=args.num_rows, overwrite=args.overwrite)
    json.dump(paths, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
