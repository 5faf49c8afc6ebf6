"""Deterministic scoring: integers for AIME, math-verify equivalence for MATH500, letters for GPQA.

Every judgement is local and reproducible (no network judge). ``score_*`` functions take the raw model output
and return a :class:`Verdict` with the extracted answer, whether it is correct and whether it was parseable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from evals.extract import extract_answer, extract_choice


@dataclass(frozen=True)
class Verdict:
    pred: str | None  # the extracted (normalised) answer; None when nothing could be read
    correct: bool  # the extracted answer matches the gold answer
    parseable: bool  # an answer could be read (False: counted in the `unparseable` metric, and wrong)


# ------------------------------------------------------------------------------------------------ math-verify glue


def _math_verify():
    try:
        import math_verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "math-verify is required for scoring; install it with `pip install \"lm-eval[math]\"`"
        ) from e
    return math_verify


@lru_cache(maxsize=4096)
def _parse(latex: str):
    """math-verify parse of an answer string (wrapped in \\boxed{} so bare expressions are found)."""
    mv = _math_verify()
    return tuple(mv.parse("\\boxed{" + latex + "}", parsing_timeout=5))


def math_equal(gold: str, pred: str | None) -> bool:
    """Symbolic equivalence of two answer strings with math-verify (gold first: the order matters there)."""
    if pred is None:
        return False
    gold_p = _parse(str(gold).strip())
    pred_p = _parse(pred.strip())
    if not gold_p or not pred_p:
        return False
    return bool(_math_verify().verify(list(gold_p), list(pred_p), timeout_seconds=5))


def math_parseable(pred: str | None) -> bool:
    return pred is not None and bool(_parse(pred.strip()))


# --------------------------------------------------------------------------------------------------------- AIME

_INT_WRAPPERS = re.compile(r"^(?:\\text\{|\\textbf\{|\\mathbf\{|\\mathrm\{)(.*)\}$")


def as_integer(s: str | None) -> int | None:
    """Read an AIME-style integer answer (``033``, ``$33$``, ``\\text{33}``, ``1{,}000``); None if not an integer."""
    if s is None:
        return None
    t = s.strip().strip("$").strip()
    prev = None
    while prev != t:
        prev = t
        m = _INT_WRAPPERS.match(t)
        if m:
            t = m.group(1).strip()
    t = t.replace("{,}", "").replace("\\,", "").replace("\\!", "").replace(" ", "")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", t):
        t = t.replace(",", "")
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    return None


def score_aime(output: str, gold: str | int) -> Verdict:
    """AIME: integer comparison (leading zeros ignored); non-integer answers go through math-verify."""
    pred = extract_answer(output)
    if pred is None:
        return Verdict(None, False, False)
    gold_int = as_integer(str(gold))
    pred_int = as_integer(pred)
    if pred_int is not None and gold_int is not None:
        return Verdict(str(pred_int), pred_int == gold_int, True)
    if not math_parseable(pred):
        return Verdict(pred, False, False)
    return Verdict(pred, math_equal(str(gold), pred), True)


def score_math(output: str, gold: str) -> Verdict:
    """MATH500: math-verify symbolic equivalence of the extracted answer and the gold answer."""
    pred = extract_answer(output)
    if pred is None or not math_parseable(pred):
        return Verdict(pred, False, False)
    return Verdict(pred, math_equal(gold, pred), True)


def score_gpqa(output: str, gold_letter: str, choices: list[str] | None = None) -> Verdict:
    """GPQA: letter A-D; an unreadable answer is unparseable (and wrong), never a default letter."""
    letter = extract_choice(output, choices)
    if letter is None:
        return Verdict(None, False, False)
    return Verdict(letter, letter == gold_letter.strip().upper(), True)


# ----------------------------------------------------------------------------------------------- majority voting


def same_answer(kind: str, a: str, b: str) -> bool:
    """Whether two extracted answers are the same vote (used for maj@k)."""
    if kind == "gpqa":
        return a == b
    if kind == "aime":
        ia, ib = as_integer(a), as_integer(b)
        if ia is not None and ib is not None:
            return ia == ib
    if a.strip() == b.strip():
        return True
    return math_equal(a, b)


def majority_answer(kind: str, preds: list[str | None]) -> str | None:
    """Most frequent answer among ``preds`` (equivalent answers pooled; unparseable ones do not vote).

    Ties go to the answer that appeared first.
    """
    clusters: list[list[str]] = []
    for p in preds:
        if p is None:
            continue
        for c in clusters:
            if same_answer(kind, c[0], p):
                c.append(p)
                break
        else:
            clusters.append([p])
    if not clusters:
        return None
    best = max(clusters, key=len)  # max keeps the first of equal-length clusters
    return best[0]


def pred_correct(kind: str, pred: str | None, gold: str) -> bool:
    """Correctness of an already extracted answer (``kind``: aime, math or gpqa)."""
    if pred is None:
        return False
    if kind == "gpqa":
        return pred == gold.strip().upper()
    if kind == "aime":
        gi, pi = as_integer(str(gold)), as_integer(pred)
        if gi is not None and pi is not None:
            return gi == pi
    return math_equal(str(gold), pred)
