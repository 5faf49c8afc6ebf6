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
                   "no-answer", "near-miss", "fp-trap", "negation"):
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
