"""Extraction, scoring, metrics, data loading and budget-forcing control logic of evals/ (fast, CPU, no network).

Every expected value below is written by hand.
"""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest

from evals import task_name
from evals.budget import (
    BudgetForcingConfig,
    budget_forced_generate,
    generate_until_budget_forced,
    make_vllm_generate,
)
from evals.data import (
    GPQA_HELP,
    DataUnavailableError,
    load_rows,
    normalise_gpqa_rows,
    resolve_local_path,
)
from evals.extract import answer_region, boxed_contents, extract_answer, extract_choice, last_answer_line
from evals.metrics import bootstrap_ci, pass_at_k_unbiased, sample_metrics
from evals.run import parse_tasks, tensor_parallel_size
from evals.scoring import as_integer, majority_answer, score_aime, score_gpqa, score_math

S = "<|im_start|>"

# ----------------------------------------------------------------------------------------------------- extraction

EXTRACTION_TABLE = [
    # (model output, expected extracted answer)
    (f"{S}think\nlet me see \\boxed{{7}} no\n{S}answer\nAnswer: \\boxed{{33}}", "33"),  # think box ignored
    ("so $\\boxed{\\frac{1}{2}}$ and done", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{12} then \\boxed{\\sqrt{2}} finally", "\\sqrt{2}"),  # last of several
    ("\\boxed{033}", "033"),
    ("The answer is 5.\nAnswer: 42", "42"),  # Answer: line without a box
    ("Answer: 3\nWait.\nAnswer: $\\frac{3}{4}$.", "\\frac{3}{4}"),  # last Answer:, $ and period stripped
    ("**Answer:** 17", "17"),  # markdown bold
    ("Final Answer:\n\n204", "204"),  # answer on the next line
    ("no final answer here, 42 maybe", None),
    ("cut off: \\boxed{\\frac{1}{", None),  # unclosed box, no Answer:
    ("\\boxed 5 is it", "5"),  # brace-less \boxed
    ("\\fbox{9}", "9"),
    (f"{S}think\nthinking... \\boxed{{1}}", "1"),  # no answer delimiter: think region used
    ("answer\nAnswer: \\boxed{x^{2}+1}", "x^{2}+1"),  # HF output with special tokens stripped
]


@pytest.mark.parametrize("output,expected", EXTRACTION_TABLE)
def test_extract_answer_table(output, expected):
    assert extract_answer(output) == expected


def test_answer_region_rules():
    assert answer_region(f"x{S}think\nT{S}answer\nA") == "\nA"
    # a new <|im_start|>user/system/assistant header after text is the next turn: the output is cut there
    # (issue 7; the old rule read the text after it, which is a turn the model should never have written)
    assert answer_region(f"x{S}assistant\nhello\nworld") == "x"
    assert answer_region(f"so 418.<|im_end|>\n{S}user\nmore") == "so 418."
    assert answer_region(f"{S}think\nT\n{S}answer\nA<|endoftext|>junk") == "\nA"
    assert answer_region("plain text") == "plain text"
    assert boxed_contents("\\boxed{a}\\fbox{b}\\boxed{c}") == ["a", "b", "c"]
    assert last_answer_line("Answer:   ") is None


# ----------------------------------------------------------------------------------------------------- verdicts

AIME_TABLE = [
    # (output, gold, correct, parseable)
    ("\\boxed{033}", "33", True, True),
    ("\\boxed{33}", "033", True, True),
    ("Answer: 033", "33", True, True),
    ("\\boxed{34}", "33", False, True),
    ("\\boxed{\\text{33}}", "33", True, True),
    ("\\boxed{$33$}", "33", True, True),
    ("\\boxed{1{,}000}", "1000", True, True),
    ("\\boxed{\\frac{66}{2}}", "33", True, True),  # non-integer form: math-verify
    ("\\boxed{33.5}", "33", False, True),
    ("I am not sure.", "33", False, False),
    (f"{S}think\n\\boxed{{33}}\n{S}answer\nAnswer: \\boxed{{25}}", "33", False, True),  # answer region wins
]


@pytest.mark.parametrize("output,gold,correct,parseable", AIME_TABLE)
def test_score_aime_table(output, gold, correct, parseable):
    v = score_aime(output, gold)
    assert (v.correct, v.parseable) == (correct, parseable)


MATH_TABLE = [
    ("\\boxed{\\frac{1}{2}}", "0.5", True, True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True, True),
    ("\\boxed{(3,\\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True, True),
    ("\\boxed{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", False, True),
    ("\\boxed{x=5}", "5", True, True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True, True),
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}", True, True),
    ("\\boxed{\\frac{13}{3}}", "\\frac{14}{3}", False, True),
    ("Answer: $p - q$", "p - q", True, True),
    ("nothing to see", "5", False, False),
]


@pytest.mark.parametrize("output,gold,correct,parseable", MATH_TABLE)
def test_score_math_table(output, gold, correct, parseable):
    v = score_math(output, gold)
    assert (v.correct, v.parseable) == (correct, parseable)


CHOICES = ["Helium", "Neon", "Argon", "Krypton"]
GPQA_TABLE = [
    # (output, gold letter, extracted letter or None)
    ("\\boxed{C}", "C", "C"),
    ("\\boxed{(C)}", "C", "C"),
    ("\\boxed{\\text{C}}", "C", "C"),
    ("Answer: B", "C", "B"),
    ("Answer: (D) Krypton", "D", "D"),
    ("Answer: **A**", "A", "A"),
    ("Answer: c", "C", "C"),
    ("Answer: Option C", "C", "C"),
    ("\\boxed{Argon}", "C", "C"),  # the text of a choice
    (f"{S}think\nmaybe \\boxed{{A}}\n{S}answer\nAnswer: \\boxed{{D}}", "D", "D"),
    ("I think it is a noble gas.", "A", None),  # never defaults to A
    ("Answer: Xenon", "A", None),
    ("Answer: E", "A", None),
    ("Answer: the answer is a noble gas", "A", None),  # the article "a" is not the letter A
    ("Answer: option b, I think", "B", None),  # a lowercase letter counts only on its own
]


@pytest.mark.parametrize("output,gold,letter", GPQA_TABLE)
def test_score_gpqa_table(output, gold, letter):
    assert extract_choice(output, CHOICES) == letter
    v = score_gpqa(output, gold, CHOICES)
    assert v.parseable == (letter is not None)
    assert v.correct == (letter == gold)


def test_as_integer():
    assert as_integer("007") == 7
    assert as_integer("-12") == -12
    assert as_integer("1,234") == 1234
    assert as_integer("12.0") is None
    assert as_integer("x") is None


# ----------------------------------------------------------------------------------------------------- metrics


def test_sample_metrics_k_outputs():
    outs = ["\\boxed{5}", "\\boxed{005}", "\\boxed{7}", "\\boxed{7}", "\\boxed{7}", "No idea."]
    m = sample_metrics("aime", [score_aime(o, "5") for o in outs], "5")
    assert m == {"acc": 2 / 6, "maj_at_k": 0.0, "pass_at_k": 1.0, "no_answer": 1.0, "truncated": 0.0,
                 "unparseable": 1.0}
    # "<|im_start|>think\n..." never reached its answer phase, "Let me expand" stops mid-sentence: truncated
    outs = ["\\boxed{5}", "\\boxed{005}", "\\boxed{7}", f"{S}think\nwe have \\boxed{{5}} so far", "Let me expand"]
    m = sample_metrics("aime", [score_aime(o, "5") for o in outs], "5")
    assert m == {"acc": 0.4, "maj_at_k": 1.0, "pass_at_k": 1.0, "no_answer": 0.0, "truncated": 2.0,
                 "unparseable": 2.0}


def test_verdict_status():
    from evals.scoring import Verdict

    assert Verdict("5", True, True).status == "answered" and Verdict(None, False, False).status == "no_answer"
    assert Verdict(None, False, False, "truncated").status == "truncated"
    with pytest.raises(ValueError, match="status"):
        Verdict(None, False, False, "unparseable")


def test_majority_pools_equivalent_answers():
    # 1/2 and 0.5 are one vote of two; 3 has one
    assert majority_answer("math", ["\\frac{1}{2}", "3", "0.5"]) in ("\\frac{1}{2}", "0.5")
    assert majority_answer("gpqa", ["A", "B", "B", None, None, None]) == "B"
    assert majority_answer("aime", [None, None]) is None
    assert majority_answer("aime", ["1", "2"]) == "1"  # tie: first seen


def test_pass_at_k_unbiased_matches_enumeration():
    n, c = 6, 2
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k_unbiased(n, c, k), brute)


def test_bootstrap_ci():
    vals = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1] * 3
    mean, lo, hi = bootstrap_ci(vals, n_boot=2000, seed=3)
    assert mean == pytest.approx(0.6)
    assert lo < 0.6 < hi
    # standard error of a proportion: sqrt(.6*.4/30) = 0.089 -> the 95% interval is roughly +-0.18
    assert 0.12 < hi - mean < 0.24 and 0.12 < mean - lo < 0.24
    assert bootstrap_ci(vals, n_boot=2000, seed=3) == (mean, lo, hi)  # deterministic
    assert bootstrap_ci([1, 1, 1], n_boot=100) == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------- data


def _gpqa_rows():
    return [
        {"Record ID": f"rec{i}", "Question": f"Synthetic question {i}: which option is marked right?",
         "Correct Answer": f"right {i}", "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b",
         "Incorrect Answer 3": f"wrong {i}c"}
        for i in range(12)
    ]


def test_gpqa_shuffle_deterministic_and_gold_letter():
    rows = normalise_gpqa_rows(_gpqa_rows(), "synthetic")
    again = normalise_gpqa_rows(list(reversed(_gpqa_rows())), "synthetic")
    assert [r["problem"] for r in rows] == [r["problem"] for r in reversed(again)]  # per question, not per order
    letters = set()
    for i, r in enumerate(rows):
        lines = r["problem"].split("\n")
        assert lines[0] == f"Synthetic question {i}: which option is marked right?" and lines[1] == ""
        assert [ln[:3] for ln in lines[2:]] == ["A) ", "B) ", "C) ", "D) "]
        gold_line = next(ln for ln in lines[2:] if ln.endswith(f"right {i}"))
        assert gold_line[0] == r["answer"]
        letters.add(r["answer"])
    assert len(letters) >= 3  # the correct answer is not always in the same place
    # the same question is shuffled the same way whether or not its source carries a Record ID
    no_ids = [{k: v for k, v in r.items() if k != "Record ID"} for r in _gpqa_rows()]
    assert [r["problem"] for r in normalise_gpqa_rows(no_ids, "x")] == [r["problem"] for r in rows]


def test_local_data_precedence(tmp_path):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir(), d2.mkdir()
    (d1 / "aime_2024.jsonl").write_text(json.dumps({"id": "a", "problem": "P1", "answer": "1"}) + "\n")
    f = d2 / "mine.json"
    f.write_text(json.dumps([{"ID": 7, "Problem": "P2", "Answer": 2}]))
    env = {"IWSFT_EVAL_DATA": str(d1)}
    assert resolve_local_path("aime24", {}, env) == d1 / "aime_2024.jsonl"
    assert resolve_local_path("aime24", {}, {**env, "IWSFT_AIME24_DATA": str(f)}) == f
    assert resolve_local_path("aime24", {"data_dir": str(d1)}, {"IWSFT_AIME24_DATA": str(f)}) == d1 / "aime_2024.jsonl"
    assert resolve_local_path("aime24", {"aime24_data": str(f), "data_dir": str(d1)}, {}) == f
    assert resolve_local_path("aime25", {"data_dir": str(d1)}, {}) is None  # not in the dir: hub
    assert load_rows("aime24", {"aime24_data": str(f)}) == [{"id": "7", "problem": "P2", "answer": "2"}]
    with pytest.raises(DataUnavailableError, match="no such file"):
        resolve_local_path("math500", {"math500_data": str(tmp_path / "missing.jsonl")}, {})


def test_gpqa_missing_gives_access_instructions(monkeypatch, tmp_path):
    import evals.data

    def gated(src):  # what the hub does without accepted terms / token (simulated: tests never go online)
        raise PermissionError(f"Dataset '{src.hf_path}' is a gated dataset on the Hub.")

    monkeypatch.setattr(evals.data, "_hub_rows", gated)
    monkeypatch.delenv("IWSFT_GPQA_DATA", raising=False)
    monkeypatch.delenv("IWSFT_EVAL_DATA", raising=False)
    with pytest.raises(DataUnavailableError) as e:
        load_rows("gpqa", {})
    msg = str(e.value)
    assert "huggingface.co/datasets/Idavidrein/gpqa" in msg and "IWSFT_GPQA_DATA" in msg
    assert GPQA_HELP in msg
    with pytest.raises(DataUnavailableError, match="Never commit"):
        load_rows("gpqa", {"gpqa_data": str(tmp_path / "nope.csv")})


def test_gpqa_csv(tmp_path):
    import csv

    path = tmp_path / "gpqa_diamond.csv"
    rows = _gpqa_rows()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    loaded = load_rows("gpqa", {"data_dir": str(tmp_path)})
    assert loaded == normalise_gpqa_rows(rows, "x")


# ----------------------------------------------------------------------------------------------------- runner bits


def test_task_names_and_tp():
    assert task_name("aime24") == "aime24_iwsft" and task_name("gpqa") == "gpqa_diamond_iwsft"
    assert parse_tasks("aime24, math500,aime24_iwsft,gpqa") == ["aime24", "math500", "gpqa_diamond"]
    with pytest.raises(ValueError):
        task_name("mmlu")
    assert tensor_parallel_size(8, 40, 8) == 8  # Qwen2.5-32B
    assert tensor_parallel_size(6, 40, 8) == 4
    assert tensor_parallel_size(3, 28, 4) == 2  # Qwen2.5-7B on 3 GPUs
    assert tensor_parallel_size(0, 40, 8) == 1
    from pathlib import Path

    from evals.run import default_labels

    assert default_labels([Path("/a/SFT/epoch_4"), Path("/a/IWSFT/epoch_4")]) == ["SFT_epoch_4", "IWSFT_epoch_4"]
    assert default_labels([Path("/a/sft"), Path("/b/iwsft")]) == ["sft", "iwsft"]


# ----------------------------------------------------------------------------------------------------- budget forcing


class FakeModel:
    """Deterministic 'model': thinks in 1-token words, wants to stop thinking after ``think_words`` words."""

    def __init__(self, think_words=3):
        self.think_words = think_words
        self.calls = []

    def __call__(self, prompts, params):
        self.calls.append((list(prompts), [dict(p) for p in params]))
        outs = []
        for prompt, p in zip(prompts, params):
            if prompt.endswith("Final Answer:"):
                text = " \\boxed{42}"
                outs.append((text, 4))
                continue
            n = min(self.think_words, p["max_tokens"])
            outs.append(("".join(f" w{i}" for i in range(n)) + ("\n" if n == self.think_words else ""), n))
        return outs


def test_budget_forcing_waits_and_answer():
    fake = FakeModel(think_words=3)
    cfg = BudgetForcingConfig(num_wait=2, thinking_tokens=100)
    out = budget_forced_generate(["P1|", "P2|"], fake, cfg, max_gen_toks=1000, until=["<|im_end|>"])
    expected = ("<|im_start|>think w0 w1 w2\nWait w0 w1 w2\nWait w0 w1 w2\n<|im_start|>answer\nFinal Answer:"
                " \\boxed{42}")
    assert out == [expected, expected]
    assert len(fake.calls) == 4  # think, 2 x Wait, answer
    think_params = fake.calls[0][1][0]
    assert think_params == {"max_tokens": 100, "min_tokens": 0, "stop": ["<|im_start|>", "<|im_end|>"]}
    assert fake.calls[1][1][0] == {"max_tokens": 97, "min_tokens": 1, "stop": ["<|im_start|>", "<|im_end|>"]}
    assert fake.calls[2][1][0]["max_tokens"] == 94
    assert fake.calls[3][1][0] == {"max_tokens": 1000 - 9, "min_tokens": 0, "stop": ["<|im_end|>"]}
    assert fake.calls[1][0][0] == "P1|<|im_start|>think w0 w1 w2\nWait"
    assert extract_answer(out[0]) == "42"


def test_budget_forcing_cap_stops_waits():
    fake = FakeModel(think_words=10)
    cfg = BudgetForcingConfig(num_wait=3, thinking_tokens=4, answer_tokens=50)
    out = budget_forced_generate(["P|"], fake, cfg, max_gen_toks=1000)
    # thinking is cut at 4 tokens: no Wait is appended, the answer phase starts on a new line
    assert out == ["<|im_start|>think w0 w1 w2 w3\n<|im_start|>answer\nFinal Answer: \\boxed{42}"]
    assert len(fake.calls) == 2 and fake.calls[1][1][0]["max_tokens"] == 50


def test_budget_forcing_zero_waits():
    fake = FakeModel(think_words=2)
    out = budget_forced_generate(["P|"], fake, BudgetForcingConfig(num_wait=0, thinking_tokens=10), 20)
    assert out == ["<|im_start|>think w0 w1\n<|im_start|>answer\nFinal Answer: \\boxed{42}"]
    assert fake.calls[-1][1][0]["max_tokens"] == 18


def test_vllm_adapter_with_fakes():
    """The vLLM glue builds SamplingParams/TokensPrompt per call and reads text + token count."""

    class SP:
        def __init__(self, **kw):
            self.kw = kw

    class TP(dict):
        pass

    class Out:
        def __init__(self, text, ids):
            self.outputs = [type("C", (), {"text": text, "token_ids": ids})()]

    class LLM:
        def __init__(self):
            self.seen = []

        def generate(self, inputs, sampling_params, use_tqdm):
            self.seen.append((inputs, sampling_params))
            return [Out("abc", [1, 2, 3]) for _ in inputs]

    llm = LLM()
    gen = make_vllm_generate(llm, lambda s: [len(s)], SP, TP, {"temperature": 0.0, "skip_special_tokens": False})
    assert gen(["xy", "z"], [{"max_tokens": 5, "min_tokens": 0, "stop": ["s"]}] * 2) == [("abc", 3), ("abc", 3)]
    inputs, sps = llm.seen[0]
    assert inputs == [{"prompt_token_ids": [2]}, {"prompt_token_ids": [1]}]
    assert sps[0].kw == {"max_tokens": 5, "min_tokens": 0, "stop": ["s"], "temperature": 0.0,
                         "skip_special_tokens": False}

    class Req:
        def __init__(self, ctx, gk):
            self.args = (ctx, gk)

    reqs = [Req("a|", {"temperature": 0}), Req("b|", {"temperature": 0.7}), Req("c|", {"temperature": 0})]
    made = []

    def make_generate(kw):
        made.append(kw)
        return FakeModel(think_words=1)

    res = generate_until_budget_forced(reqs, make_generate, BudgetForcingConfig(num_wait=0),
                                       lambda gk: (dict(gk), ["<|im_end|>"], 64))
    assert made == [{"temperature": 0}, {"temperature": 0.7}]  # grouped by generation kwargs, order kept
    assert res == ["<|im_start|>think w0\n<|im_start|>answer\nFinal Answer: \\boxed{42}"] * 3


def test_vllm_bf_registration_keeps_builtin_models():
    from lm_eval.api.registry import model_registry

    from evals.budget import register

    register()
    assert "vllm_bf" in model_registry and "vllm" in model_registry and "hf" in model_registry


def test_runner_rejects_sampling_without_temperature(tmp_path):
    from evals.run import main

    with pytest.raises(SystemExit, match="--temperature > 0"):
        main(["--checkpoint", str(tmp_path), "--samples", "4", "--temperature", "0", "--output", str(tmp_path)])


def test_compare_reinvocation_argv():
    from evals.run import _argv_for, build_parser

    args = build_parser().parse_args(["--checkpoint", "A", "--compare", "B", "--tasks", "aime24", "--samples", "16",
                                      "--temperature", "0.6", "--output", "res"])
    argv = _argv_for(args, "/x/B", "B")
    assert argv[1:] == ["-m", "evals.run", "--checkpoint", "/x/B", "--label", "B", "--tasks", "aime24", "--output",
                        "res", "--samples", "16", "--temperature", "0.6"]


# ------------------------------------------------------------------------------------ bad input, bounded work


def test_output_must_be_text():
    """bytes (an undecoded output) is a TypeError that names the argument and the fix; None reads as empty."""
    from evals.scoring import verify

    with pytest.raises(TypeError, match=r"output must be str .*decode"):
        verify("math", b"\\boxed{5}", "5")
    assert verify("aime", None, "5").status == "no_answer"


@pytest.mark.parametrize("kind,gold,choices,match", [
    ("aime", None, None, "'answer' field.*empty"),
    ("math", "", None, "'answer' field.*empty"),
    ("aime", "abc", None, "AIME problem must be an integer"),
    ("gpqa", "E", None, "letter A-D"),
    ("gpqa", None, None, "'answer' field.*empty"),
    ("gpqa", "B", ["x", "y", "z"], "4 option texts"),
])
def test_invalid_gold_is_an_error(kind, gold, choices, match):
    """An invalid gold answer is a ValueError naming the field, never a silent 0."""
    from evals.scoring import verify

    with pytest.raises(ValueError, match=match):
        verify(kind, "\\boxed{B}", gold, choices=choices)


def test_process_results_names_the_problem():
    """lm-eval's hook re-raises a bad gold with the problem id, and still scores valid rows (int gold, no choices)."""
    from evals import utils

    with pytest.raises(ValueError, match=r"id='p7'.*must be an integer"):
        utils.process_aime({"id": "p7", "answer": "n/a"}, [["\\boxed{5}"]])
    assert utils.process_aime({"id": "p1", "answer": 5}, [["\\boxed{5}"]])["acc"] == 1.0
    assert utils.process_gpqa({"id": "g1", "answer": "B"}, [["(B)"]])["acc"] == 1.0


def test_math_verify_never_sees_long_candidates(monkeypatch):
    """A 'value' of thousands of terms is no answer, and math-verify (whose parser takes minutes on it) is never
    handed more than MAX_PARSE_CHARS (+ the few characters of its wrapper)."""
    import math_verify

    from evals import extract
    from evals.scoring import verify

    seen = []
    real = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", lambda text, *a, **k: seen.append(len(text)) or real(text, *a, **k))
    extract.parse_latex_answer.cache_clear()
    extract.parse_statement.cache_clear()
    for out in ("The answer is $" + "1+" * 3000 + "1$.", "\\boxed{" + "1+" * 3000 + "1}"):
        v = verify("math", out, "3001")
        assert (v.correct, v.status) == (False, "no_answer")
    assert max(seen, default=0) <= extract.MAX_PARSE_CHARS + 20


def test_pathological_shapes_do_not_crash():
    """A 500-deep brace nest, an unclosed ``$`` at the end of a long output, a looping tail."""
    from evals.scoring import verify

    assert verify("math", "\\boxed{" + "{" * 500 + "5" + "}" * 500 + "}", "5").status in ("answered", "no_answer")
    assert verify("math", "The answer is $" + "1+" * 20000, "5").status == "truncated"
    assert verify("aime", "\\boxed{204}\n" + "Wait, let me re-check the value of t. " * 40, "204").status \
        == "truncated"


def test_normalise_unicode():
    """Unicode maths becomes LaTeX/ASCII (hand-written expectations)."""
    from evals.extract import normalise_unicode

    assert normalise_unicode("２０４") == "204"
    assert normalise_unicode("½") == "\\frac{1}{2}"
    assert normalise_unicode("2½") == "\\frac{5}{2}"
    assert normalise_unicode("√2 and √(x+1)") == "\\sqrt{2} and \\sqrt{x+1}"
    assert normalise_unicode("x² − 1") == "x^{2} - 1"
    assert normalise_unicode("2\u200b04") == "204"
    assert normalise_unicode("plain ascii") == "plain ascii"
