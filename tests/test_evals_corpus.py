"""The answer checker against a hand-graded corpus of model outputs (tests/data/eval_corpus.jsonl).

Each line is one output in a shape real models write (R1 ``<think>`` traces, s1 ``<|im_start|>think ...
<|im_start|>answer``, Minerva "Final Answer" sentences, GPQA replies, truncated outputs, turns that run on) with the
gold answer and the verdict a careful human grader gives it: ``correct`` and ``status`` (``answered``,
``no_answer`` or ``truncated``). The verdicts were written by hand, not by running the checker; they are the
oracle here. Every verdict must match; a false positive (a wrong or unread answer scored correct) is the failure
that matters most, so it is reported on its own.

Run with ``-s`` to see the agreement summary.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from evals.scoring import pred_correct, verify

CORPUS = Path(__file__).resolve().parent / "data" / "eval_corpus.jsonl"
STATUSES = {"answered", "no_answer", "truncated"}


def _load() -> list[dict]:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        assert {"id", "kind", "output", "gold", "correct", "status"} <= set(r), r.get("id")
        assert r["kind"] in ("aime", "math", "gpqa") and r["status"] in STATUSES, r["id"]
        assert not (r["correct"] and r["status"] != "answered"), f"{r['id']}: an unread answer cannot be correct"
    return rows


ROWS = _load()


def test_corpus_shape():
    """The corpus the issue asks for: >= 120 outputs, >= 1/3 of them wrong, every kind of failure covered."""
    assert len(ROWS) >= 120
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    wrong_answers = [r for r in ROWS if not r["correct"] and r["status"] == "answered"]
    assert len(wrong_answers) >= len(ROWS) / 3  # read, but wrong: mostly near-misses
    tags = Counter(t for r in ROWS for t in r["tags"])
    for needed in ("eot", "sentence", "minerva", "budget-forcing", "percent", "degrees", "units", "gpqa",
                   "ambiguous", "multi-box", "statement-after-box", "fallback", "r1", "long", "s1", "truncated",
                   "no-answer", "near-miss", "fp-trap", "negation", "retraction", "qualifier", "bold", "unicode",
                   "empty-cue", "verification"):
        assert tags[needed] >= 1, f"no corpus entry tagged {needed!r}"
    assert Counter(r["kind"] for r in ROWS)["gpqa"] >= 20
    assert Counter(r["status"] for r in ROWS)["truncated"] >= 5


def test_corpus_verdicts():
    """Every hand-written verdict; prints agreement, false positives and false negatives."""
    mismatches, false_pos, false_neg = [], [], []
    for r in ROWS:
        v = verify(r["kind"], r["output"], r["gold"], choices=r.get("choices"))
        got, want = (v.correct, v.status), (r["correct"], r["status"])
        if got != want:
            mismatches.append(f"{r['id']}: want {want}, got {got} (read {v.pred!r}, gold {r['gold']!r})")
        if v.correct and not r["correct"]:
            false_pos.append(r["id"])
        if r["correct"] and not v.correct:
            false_neg.append(r["id"])
        if v.parseable and pred_correct(r["kind"], v.pred, r["gold"]) != v.correct:
            # maj@k re-scores the answer string read here: it must reach the same verdict
            mismatches.append(f"{r['id']}: the answer read, {v.pred!r}, re-scores differently for maj@k")
    n = len(ROWS)
    by_status = Counter(r["status"] for r in ROWS)
    print(f"\neval corpus: {n} outputs ({sum(not r['correct'] for r in ROWS)} wrong or unread; "
          f"{dict(by_status)}); agreement {n - len(mismatches)}/{n} = {100 * (n - len(mismatches)) / n:.1f}%; "
          f"false positives {len(false_pos)}; false negatives {len(false_neg)}")
    for m in mismatches:
        print("  " + m)
    assert not false_pos, f"false positives: {false_pos}"
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("max_gen_toks,gen_tokens,status", [(100, 100, "truncated"), (100, 57, "no_answer")])
def test_token_count_decides_truncation(max_gen_toks, gen_tokens, status):
    """With the generated token count known, truncation is gen_tokens >= max_gen_toks, whatever the text."""
    out = "I like turtles. The end."  # a finished-looking text
    assert verify("aime", out, "5", gen_tokens=gen_tokens, max_gen_toks=max_gen_toks).status == status
    cut = "We expand the product and get"  # an unfinished-looking text
    assert verify("aime", cut, "5", gen_tokens=gen_tokens, max_gen_toks=max_gen_toks).status == status


def test_unfinished_think_read_only_when_the_model_stopped():
    """s1's extraction reads the think text when there is no answer phase; we do that only when the token count
    shows the model stopped by itself (else the box is a tentative one in a cut-off trace)."""
    out = "<|im_start|>think\nSo the count is 6. Final check done: the answer is \\boxed{6}."
    assert verify("aime", out, "6").status == "truncated"
    assert verify("aime", out, "6", gen_tokens=40, max_gen_toks=32768).correct
    assert verify("aime", out, "6", gen_tokens=32768, max_gen_toks=32768).status == "truncated"


def test_verify_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of aime, math, gpqa"):
        verify("mmlu", "\\boxed{A}", "A")


# ------------------------------------------------------------------------------------ MATH500 reference solutions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def math500() -> list[dict]:
    path = DATA / "math500.jsonl"
    if not path.is_file():
        pytest.fail(f"evaluation data missing: expected {path} (the shared data directory beside the repository)",
                    pytrace=False)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _unbox(text: str) -> str:
    """The text with every \\boxed{X} replaced by X (written here with its own brace matching)."""
    out, i = [], 0
    while True:
        j = text.find("\\boxed{", i)
        if j < 0:
            return "".join(out) + text[i:]
        out.append(text[i:j])
        depth, k = 0, j + len("\\boxed")
        while k < len(text):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                break
            k += 1
        out.append(text[j + len("\\boxed{"):k])
        i = k + 1


@pytest.mark.slow
def test_math500_reference_solutions(math500):
    """The 500 human-written MATH500 solutions (the dataset's, independent of this code) read as correct against
    their own answer, and none of every 2nd one reads as correct against another problem's answer (a
    false-positive probe; pairs whose answers are equivalent are skipped). ~10 s of CPU."""
    from evals.scoring import math_equal

    wrong = [r["id"] for r in math500 if not verify("math", r["solution"], r["answer"]).correct]
    assert not wrong, f"reference solutions scored wrong: {wrong[:10]}"
    n = len(math500)
    false_pos = []
    for i, r in list(enumerate(math500))[::2]:
        other = math500[(i + 7) % n]["answer"]
        if math_equal(r["answer"], other):
            continue
        if verify("math", r["solution"], other).correct:
            false_pos.append(r["id"])
        # without its boxes the solution ends in prose: the fallback may read it or not, but never wrongly
        if verify("math", _unbox(r["solution"]), other).correct:
            false_pos.append(r["id"] + " (unboxed)")
    assert not false_pos, f"false positives: {false_pos[:10]}"


def test_math500_solutions_in_model_shapes(math500):
    """Every 4th solution rewritten into the shapes models produce, with the verdict that shape must get: s1
    think/answer with an ``Answer:`` line, Minerva's unboxed solution plus its ``Final Answer`` sentence, an R1
    trace cut off halfway (truncated, never read), and a turn that runs on into a user turn with another answer."""
    for r in math500[::4]:
        sol, gold = r["solution"], r["answer"]
        s1 = f"<|im_start|>think\n{_unbox(sol)}\n<|im_start|>answer\nAnswer: ${gold}$"
        assert verify("math", s1, gold).correct, r["id"]
        minerva = _unbox(sol).rstrip() + f"\nFinal Answer: The final answer is ${gold}$. I hope it is correct."
        assert verify("math", minerva, gold).correct, r["id"]
        cut = "<think>\n" + sol[: len(sol) // 2]
        v = verify("math", cut, gold)
        assert (v.correct, v.status) == (False, "truncated"), r["id"]
        runs_on = sol + "<|im_end|>\n<|im_start|>user\nAnd the answer to the next one?<|im_end|>\n" \
            "<|im_start|>assistant\n\\boxed{0.123456}"
        assert verify("math", runs_on, gold).correct, r["id"]
