"""s1K / chat dataset builders and the iw-SFT collate, on the tiny offline tokenizer and data."""

import json
import logging
from pathlib import Path

import pytest
import torch

from iwsft.tiny import DEFAULT_SYSTEM_PROMPT, build_tiny_assets

IGNORE = -100


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=3, num_rows=32)


@pytest.fixture(scope="module")
def rows(assets):
    return [json.loads(line) for line in Path(assets["data"]).read_text().splitlines()]


def make_tok(assets, max_seq_len=None):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    return qwen2_5_tokenizer(path=assets["vocab"], merges_file=assets["merges"],
                             special_tokens_path=assets["tokenizer_json"], max_seq_len=max_seq_len)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------- collate


def test_collate_matches_torchtune_and_keeps_ids():
    from torchtune.data import padded_collate_sft

    from iwsft.tune.collate import padded_collate_iwsft

    g = torch.Generator().manual_seed(0)
    batch = []
    for i, n in enumerate([5, 9, 1, 7]):
        toks = torch.randint(0, 50, (n,), generator=g).tolist()
        labs = [t if k % 3 else IGNORE for k, t in enumerate(toks)]
        batch.append({"tokens": toks, "labels": labs, "sample_id": 10 + i, "quality": 0.5 * i})
    ref = padded_collate_sft(batch, padding_idx=7, ignore_idx=IGNORE)
    out = padded_collate_iwsft(batch, padding_idx=7, ignore_idx=IGNORE)
    assert out["tokens"].dtype == out["labels"].dtype == out["sample_id"].dtype == torch.long
    assert out["quality"].dtype == torch.float32
    assert torch.equal(out["tokens"], ref["tokens"]) and torch.equal(out["labels"], ref["labels"])
    assert out["sample_id"].tolist() == [10, 11, 12, 13]
    assert out["quality"].tolist() == [0.0, 0.5, 1.0, 1.5]

    padded = padded_collate_iwsft(batch, padding_idx=7, ignore_idx=IGNORE, pad_to_multiple_of=4)
    assert padded["tokens"].shape == (4, 12)
    assert torch.equal(padded["tokens"][:, :9], ref["tokens"]) and (padded["tokens"][:, 9:] == 7).all()
    assert (padded["labels"][:, 9:] == IGNORE).all()
    # samples without the extra keys get the documented defaults
    plain = padded_collate_iwsft([{"tokens": [1, 2], "labels": [1, 2]}])
    assert plain["sample_id"].tolist() == [-1] and plain["quality"].tolist() == [1.0]


# ---------------------------------------------------------------------------------------------------- s1 format


def test_s1_layout_exact(assets, tmp_path):
    from iwsft.tune.datasets import s1k_dataset

    tok = make_tok(assets)
    row = {"question": "What is 2 + 3?", "solution": "5",
           "deepseek_thinking_trajectory": "\n  2 plus 3 is 5.  \n", "deepseek_attempt": "It is \\boxed{5}.",
           "deepseek_grade": "Yes", "cot_type": "math", "source_type": "hand"}
    ds = s1k_dataset(tok, source=write_jsonl(tmp_path / "one.jsonl", [row]))
    s = ds[0]

    def enc(text):
        return tok.encode(text, add_bos=False, add_eos=False)

    S, E = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    prompt = ([S] + enc("system\n") + enc(DEFAULT_SYSTEM_PROMPT) + [E] + enc("\n")
              + [S] + enc("user\n") + enc("What is 2 + 3?") + [E] + enc("\n")
              + [S] + enc("assistant\n"))
    answer = [S] + enc("think\n2 plus 3 is 5.\n") + [S] + enc("answer\nAnswer: It is \\boxed{5}.") + [E]
    assert s["tokens"] == prompt + answer
    assert s["labels"] == [IGNORE] * len(prompt) + answer  # assistant only; the closing <|im_end|> IS trained
    assert s["sample_id"] == 0 and s["quality"] == 1.0
    # torchtune's own behaviour (header trained) on request
    header = [S] + enc("assistant\n")
    h = s1k_dataset(tok, source=str(tmp_path / "one.jsonl"), train_on_header=True)[0]
    assert h["tokens"] == s["tokens"]
    assert h["labels"] == [IGNORE] * (len(prompt) - len(header)) + header + answer

    # independent check with transformers' tokenizer and the Qwen chat template (which ends with "<|im_end|>\n")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(assets["model_dir"])
    text = hf.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant",
          "content": "<|im_start|>think\n2 plus 3 is 5.\n<|im_start|>answer\nAnswer: It is \\boxed{5}."}],
        tokenize=False)
    assert hf.encode(text, add_special_tokens=False) == s["tokens"] + enc("\n")


def test_s1_answer_prefix_and_trace_list():
    from iwsft.tune.datasets import s1_assistant_text

    assert s1_assistant_text("t", "x\nAnswer: 5").endswith("<|im_start|>answer\nx\nAnswer: 5")
    assert s1_assistant_text("t", "5").endswith("<|im_start|>answer\nAnswer: 5")
    assert s1_assistant_text(["a", "b "], "5").startswith("<|im_start|>think\na\nb\n<|im_start|>answer")


def test_final_im_end_trained_even_with_tokenizer_max_seq_len(assets):
    """torchtune #2792: a tokenizer with max_seq_len masks the last token even when nothing is cut."""
    from iwsft.tune.datasets import s1k_dataset

    tok = make_tok(assets, max_seq_len=4096)
    ds = s1k_dataset(tok, source=assets["data"])
    E = tok.special_tokens["<|im_end|>"]
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"][-1] == E and s["labels"][-1] == E
    # the stock tokenizer path really has the bug (so this test guards something)
    from iwsft.tune.datasets import s1_messages

    _, mask = tok.tokenize_messages(s1_messages("q", "t", "a"))
    assert mask[-1] is True


def test_drop_with_count_and_truncate(assets, rows, caplog):
    from iwsft.tune.datasets import s1k_dataset

    tok = make_tok(assets)
    full = s1k_dataset(tok, source=assets["data"])
    lengths = {int(i): int(n) for i, n in zip(full.sample_ids, full.lengths)}
    limit = sorted(lengths.values())[len(lengths) // 2]
    too_long = sorted(i for i, n in lengths.items() if n > limit)
    assert 0 < len(too_long) < len(rows)

    with caplog.at_level(logging.INFO, logger="iwsft.tune.datasets"):
        ds = s1k_dataset(tok, source=assets["data"], max_seq_len=limit)
    assert f"dropped {len(too_long)} of {len(rows)} rows longer than max_seq_len={limit}" in caplog.text
    assert ds.num_dropped == len(too_long)
    assert sorted(ds.sample_ids.tolist()) == sorted(set(lengths) - set(too_long))
    # the tokenizer's own max_seq_len is the default limit
    assert len(s1k_dataset(make_tok(assets, max_seq_len=limit), source=assets["data"])) == len(ds)

    cut = s1k_dataset(tok, source=assets["data"], max_seq_len=limit, truncate=True)
    assert len(cut) == len(rows) and cut.num_truncated == len(too_long)
    for k in range(len(cut)):
        a, b = cut[k], full[k]
        assert a["tokens"] == b["tokens"][:limit] and a["labels"] == b["labels"][:limit]

    with pytest.raises(ValueError, match="no samples left"):
        s1k_dataset(tok, source=assets["data"], max_seq_len=8)


def test_filter_grade_keeps_sample_ids(assets, rows):
    from iwsft.tune.datasets import s1k_dataset

    tok = make_tok(assets)
    full = s1k_dataset(tok, source=assets["data"], quality_column="quality")
    yes = s1k_dataset(tok, source=assets["data"], filter_grade="Yes", quality_column="quality")
    expect = [i for i, r in enumerate(rows) if r["deepseek_grade"] == "Yes"]
    assert 0 < len(expect) < len(rows)
    assert yes.sample_ids.tolist() == expect
    by_id = {full[k]["sample_id"]: full[k] for k in range(len(full))}
    for k in range(len(yes)):
        s = yes[k]
        assert s == by_id[s["sample_id"]]
        assert s["quality"] == rows[s["sample_id"]]["quality"]
    no = s1k_dataset(tok, source=assets["data"], filter_grade=["No"])
    assert sorted(no.sample_ids.tolist() + expect) == list(range(len(rows)))
    assert yes.fingerprint() != full.fingerprint()
    assert full.fingerprint() == s1k_dataset(tok, source=assets["data"], quality_column="quality").fingerprint()


def test_local_parquet_and_data_files(assets, rows, tmp_path):
    import datasets

    from iwsft.tune.datasets import s1k_dataset

    tok = make_tok(assets)
    pq = tmp_path / "s1k.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    a = s1k_dataset(tok, source=str(pq))
    b = s1k_dataset(tok, source="json", data_files=assets["data"])
    c = s1k_dataset(tok, data_files=assets["data"])
    assert len(a) == len(b) == len(c) == len(rows)
    assert all(a[k] == b[k] == c[k] for k in range(len(rows)))


@pytest.mark.parametrize("bad, column", [
    ({"deepseek_attempt": None}, "deepseek_attempt"),
    ({"question": "   "}, "question"),
    ({"deepseek_thinking_trajectory": 17}, "deepseek_thinking_trajectory"),
    ({"quality": "high"}, "quality"),
    ("drop:deepseek_attempt", "deepseek_attempt"),
])
def test_malformed_rows(assets, rows, tmp_path, bad, column):
    from iwsft.tune.datasets import s1k_dataset

    broken = [dict(r) for r in rows[:4]]
    if isinstance(bad, str):
        del broken[2][bad.split(":")[1]]
    else:
        broken[2].update(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", broken)
    with pytest.raises(ValueError, match=rf"row 2\b.*{column}"):
        s1k_dataset(make_tok(assets), source=path, quality_column="quality")
    ok = s1k_dataset(make_tok(assets), source=path, quality_column="quality", skip_invalid=True)
    assert ok.sample_ids.tolist() == [0, 1, 3] and ok.num_invalid == 1


def test_packed_rejected(assets):
    from iwsft.tune.datasets import s1k_dataset

    with pytest.raises(ValueError, match="packed"):
        s1k_dataset(make_tok(assets), source=assets["data"], packed=True)


# ---------------------------------------------------------------------------------------------------- chat


def test_chat_dataset(assets, tmp_path):
    from iwsft.tune.datasets import chat_dataset

    tok = make_tok(assets)
    convs = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "score": 0.25},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}], "score": 2},
    ]
    ds = chat_dataset(tok, source=write_jsonl(tmp_path / "chat.jsonl", convs), quality_column="score",
                      system_prompt=DEFAULT_SYSTEM_PROMPT)
    assert [ds[k]["quality"] for k in range(2)] == [0.25, 2.0] and ds.sample_ids.tolist() == [0, 1]

    def enc(text):
        return tok.encode(text, add_bos=False, add_eos=False)

    S, E = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    s = ds[0]
    sys_ = [S] + enc("system\n") + enc(DEFAULT_SYSTEM_PROMPT) + [E] + enc("\n")
    u1 = [S] + enc("user\n") + enc("Hi") + [E] + enc("\n")
    a1h, a1 = [S] + enc("assistant\n"), enc("Hello") + [E] + enc("\n")
    u2 = [S] + enc("user\n") + enc("2+2?") + [E] + enc("\n")
    a2h, a2 = [S] + enc("assistant\n"), enc("4") + [E]
    assert s["tokens"] == sys_ + u1 + a1h + a1 + u2 + a2h + a2
    ign = lambda x: [IGNORE] * len(x)  # noqa: E731
    assert s["labels"] == ign(sys_ + u1 + a1h) + a1 + ign(u2 + a2h) + a2
    # the given system prompt replaces the default
    assert ds[1]["tokens"][:len(enc("system\nBe brief."))+1] == [S] + enc("system\n") + enc("Be brief.")

    bad = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}], "score": 1}]
    with pytest.raises(ValueError, match=r"row 0.*messages.*robot"):
        chat_dataset(tok, source=write_jsonl(tmp_path / "bad.jsonl", bad))
