"""Deterministic scoring: integers for AIME, math-verify equivalence for MATH500, letters for GPQA.

Every judgement is local and reproducible (no network judge). :func:`verify` (and ``score_aime`` /
``score_math`` / ``score_gpqa``) take the raw model output and the gold answer and return a :class:`Verdict`: the
answer read (rules in :mod:`evals.extract` and docs/evals.md), whether it is correct, and - when nothing could be
read - whether the output was ``truncated`` (it hit ``max_gen_toks``) or finished with ``no_answer``.

Truncation (``Verdict.status == "truncated"``): when the generated token count and ``max_gen_toks`` are passed,
``gen_tokens >= max_gen_toks``; otherwise (lm-eval's ``process_results`` sees only the text, with the stop string
already removed) it is inferred from the text. Not truncated: an end-of-turn marker was seen (the model stopped).
Truncated: a think phase opened and never closed (s1 ``<|im_start|>think`` without ``<|im_start|>answer``, R1
``<think>`` without ``</think>``), a ``\boxed{`` left open, a repetition loop at the end, or text that stops
without a sentence end (unless its last line is an answer statement or a bare value).

math-verify times its work out with SIGALRM, so call these from the main thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from evals.extract import (
    AMBIGUOUS,
    cue_statements,
    final_choice,
    final_math_answer,
    has_open_box,
    is_math_only,
    mv_timeout,
    parse_latex_answer,
    split_reply,
    time_budget,
)

ANSWERED, NO_ANSWER, TRUNCATED = "answered", "no_answer", "truncated"
KINDS = ("aime", "math", "gpqa")
# Total math-verify seconds one output may use (parse + compare; see :func:`evals.extract.time_budget`). Past it,
# what is left reads as nothing. Typical outputs use a few milliseconds (docs/evals.md, "Cost").
TIME_BUDGET_S = 10


@dataclass(frozen=True)
class Verdict:
    pred: str | None  # the answer read (as written; the letter for GPQA); None when nothing could be read
    correct: bool  # the answer read matches the gold answer
    parseable: bool  # an answer could be read (False: counted as no_answer or truncated, and wrong)
    status: str = field(default="")  # "answered", "no_answer" or "truncated" (default: from ``parseable``)

    def __post_init__(self):
        if not self.status:
            object.__setattr__(self, "status", ANSWERED if self.parseable else NO_ANSWER)
        if self.status not in (ANSWERED, NO_ANSWER, TRUNCATED):
            raise ValueError(f"Verdict.status must be answered, no_answer or truncated, got {self.status!r}")


# ------------------------------------------------------------------------------------------------ truncation


def looks_truncated(output: str, gen_tokens: int | None = None, max_gen_toks: int | None = None) -> bool:
    """Whether an output stopped at the token limit (see the module docstring for the exact rule)."""
    if gen_tokens is not None and max_gen_toks is not None:
        return gen_tokens >= max_gen_toks
    reply = split_reply(output or "")
    if reply.ended:
        return False  # an end-of-turn marker: the model stopped by itself
    if reply.think_unfinished or has_open_box(reply.region):
        return True
    tail = reply.region.rstrip()
    if _looping(tail):
        return True  # a degenerate repetition loop runs until the token limit
    if not tail:
        # nothing after the last phase header: the model stopped there (at most a newline or two before its end
        # token), unless it wrote only whitespace, which runs on until the token limit
        return len(reply.region) >= 4
    if _open_math(tail):
        return True  # it stopped inside a "$ ..." / "\[ ..." span
    if re.search(r"(?:[.!?)\]}*$`\"'\u3002]|\\\]|\\\))\s*\Z", tail):
        return False  # a sentence end
    last_line = tail.split("\n")[-1]
    # a last line that is an answer statement ("Answer: B or C") or only a value ("204") is a finished reply
    value_line = is_math_only(last_line.strip("*_ ")) and not re.search(r"[-+*/=(,^_\\{]\s*\Z", last_line)
    return not (cue_statements(last_line) or value_line)


def _open_math(text: str) -> bool:
    r"""The text ends inside a math span: an odd number of unescaped ``$`` with no sentence end after the last one,
    or a ``\[`` / ``\(`` never closed."""
    last = text.rfind("$")
    if last >= 0 and (text.count("$") - text.count("\\$")) % 2 and not re.search(r"[.!?]\s*\Z", text[last:]):
        return True
    return text.rfind("\\[") > text.rfind("\\]") or text.rfind("\\(") > text.rfind("\\)")


def _looping(text: str, times: int = 4, longest: int = 400) -> bool:
    """The text ends with the same chunk (1 to ``longest`` characters) repeated at least ``times`` times, or its
    last 12 non-empty lines hold at most 3 distinct ones."""
    for period in range(1, min(longest, len(text) // times) + 1):
        chunk = text[-period:]
        # (closing brackets alone are the end of a nested expression, not a loop)
        if text.endswith(chunk * times) and chunk.strip(" \n})]") and period * times >= 40:
            return True
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()][-12:]
    return len(lines) == 12 and len(set(lines)) <= 3


def _unread(output: str, gen_tokens, max_gen_toks) -> Verdict:
    status = TRUNCATED if looks_truncated(output, gen_tokens, max_gen_toks) else NO_ANSWER
    return Verdict(None, False, False, status)


def _region(output: str, gen_tokens, max_gen_toks) -> str | None:
    """The answer region, or None when the think phase is unfinished and the output is (or may be) truncated.

    A think phase that never closed is read only when the token count shows the model stopped by itself (then the
    think text is its reply, as in s1's extraction).
    """
    reply = split_reply(output or "")
    if reply.think_unfinished:
        finished = gen_tokens is not None and max_gen_toks is not None and gen_tokens < max_gen_toks
        return reply.region if (finished or reply.ended) else None
    return reply.region


# ------------------------------------------------------------------------------------------------ comparison


def _mv():
    import math_verify

    return math_verify


def gold_parse(gold: str) -> tuple:
    """math-verify parse of a gold answer (same normalisation as a box: units and percent signs dropped)."""
    return parse_latex_answer(str(gold).strip())


def unsolved_equation(parsed: tuple) -> bool:
    """The parse is an equation whose left side is an expression in one unknown other than the unknown itself
    (``2x = 3``, ``x^2 = 9``): an equation still to be solved, not an answer. math-verify would compare its right
    side with a plain gold (``2x = 3`` against ``3``); a grader would not. ``x = 5``, ``f(x) = x^2 + 1``,
    ``m + n = 37`` and ``(17 + 45)/2 = 31`` are answers."""
    import sympy

    expr = next((p for p in parsed if not isinstance(p, str)), None)
    if isinstance(expr, sympy.And) and expr.args:
        expr = expr.args[0]
    if not isinstance(expr, sympy.Eq):
        return False
    from sympy.core.function import AppliedUndef

    lhs = expr.lhs
    if isinstance(lhs, (sympy.Symbol, AppliedUndef, sympy.Indexed)):
        return False  # "x = 5", "f(x) = x^2 + 1", "a_3 = 7": a name and its value
    return len(getattr(lhs, "free_symbols", set())) == 1


def parsed_equal(gold: str, pred_parsed: tuple) -> bool:
    """math-verify equivalence of a gold string and a parsed prediction (gold first: the order matters there).

    An unsolved equation (:func:`unsolved_equation`) matches only a gold that is an equation itself."""
    gold_p = gold_parse(gold)
    if not gold_p or not pred_parsed:
        return False
    if unsolved_equation(pred_parsed) and not unsolved_equation(gold_p) and "=" not in str(gold):
        return False
    timeout = mv_timeout()
    if timeout is None:
        return False  # the output's time budget is spent: not read as correct
    return bool(_mv().verify(list(gold_p), list(pred_parsed), timeout_seconds=timeout))


def math_equal(gold: str, pred: str | None) -> bool:
    """Symbolic equivalence of two answer strings with math-verify (gold first)."""
    if pred is None:
        return False
    return parsed_equal(gold, parse_latex_answer(pred.strip()))


def math_parseable(pred: str | None) -> bool:
    return pred is not None and bool(parse_latex_answer(pred.strip()))


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
    t = t.replace("{,}", "").replace("\\,", "").replace("\\!", "").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(?: \d{3})+", t):  # "20 736"; "20 4" stays two numbers
        t = t.replace(" ", "")
    m = re.fullmatch(r"\((\d+)\)", t)  # "\textbf{(073)}": an AMC-style label around the integer
    if m:
        t = m.group(1)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", t):
        t = t.replace(",", "")
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    return None


def _parsed_integer(parsed: tuple) -> int | None:
    """The integer a math-verify parse stands for (``Integer(33)``), else None."""
    for p in parsed:
        if isinstance(p, str):
            continue
        if getattr(p, "is_Integer", False):
            return int(p)
        return None
    return None


def check_output(output) -> str:
    """The model output as ``str`` (None reads as the empty output).

    Raises:
        TypeError: ``output`` is not text (bytes must be decoded by the caller: ``output.decode("utf-8")``).
    """
    if output is None:
        return ""
    if isinstance(output, (bytes, bytearray)):
        raise TypeError("output must be str (the decoded model output), got bytes: decode it first, "
                        "e.g. output.decode('utf-8')")
    if not isinstance(output, str):
        raise TypeError(f"output must be str (the model output), got {type(output).__name__}")
    return output


def check_gold(kind: str, gold, choices: list[str] | None = None) -> str:
    """The gold answer as a stripped string, checked for ``kind``; an invalid gold is an error, never a silent 0.

    Raises:
        ValueError: the gold answer is None or empty; an AIME gold is not an integer; a GPQA gold is not one of the
            letters A-D; GPQA ``choices`` are given but are not 4 option texts.
    """
    if gold is None or isinstance(gold, bool) or not str(gold).strip():
        raise ValueError(f"gold answer ('answer' field) is empty ({gold!r}) for kind {kind!r}: the data row must "
                         "hold its reference answer")
    text = str(gold).strip()
    if kind == "aime" and as_integer(text) is None:
        raise ValueError(f"gold answer ('answer' field) of an AIME problem must be an integer, got {gold!r}")
    if kind == "gpqa":
        if text.upper() not in ("A", "B", "C", "D"):
            raise ValueError(f"gold answer ('answer' field) of a GPQA problem must be the letter A-D of the correct "
                             f"choice, got {gold!r}")
        if choices is not None and len(choices) not in (0, 4):
            raise ValueError(f"GPQA 'choices' must be the 4 option texts in A-D order, got {len(choices)}")
        text = text.upper()
    return text


def score_aime(output: str, gold: str | int, *, gen_tokens: int | None = None,
               max_gen_toks: int | None = None) -> Verdict:
    """AIME: integer comparison (leading zeros ignored); a non-integer form (``\\frac{66}{2}``) goes through
    math-verify. ``gen_tokens``/``max_gen_toks``: see :func:`looks_truncated`. Raises as :func:`check_output` /
    :func:`check_gold`."""
    output, gold = check_output(output), check_gold("aime", gold)
    with time_budget(TIME_BUDGET_S):
        reading = _read_math(output, gen_tokens, max_gen_toks)
        if isinstance(reading, Verdict):
            return reading
        gold_int = as_integer(gold)
        pred_int = as_integer(reading.text)
        if pred_int is None:
            pred_int = _parsed_integer(reading.parsed)
        if pred_int is not None and gold_int is not None:
            return Verdict(str(pred_int), pred_int == gold_int, True)
        return Verdict(reading.text, parsed_equal(gold, reading.parsed), True)


def _known_truncated(gen_tokens, max_gen_toks) -> bool:
    return gen_tokens is not None and max_gen_toks is not None and gen_tokens >= max_gen_toks


def _read_math(output: str, gen_tokens, max_gen_toks):
    """The final math answer read from the assistant turn, or the unread :class:`Verdict` (no_answer/truncated)."""
    region = _region(output, gen_tokens, max_gen_toks)
    reading = final_math_answer(region, allow_fallback=not _known_truncated(gen_tokens, max_gen_toks)) \
        if region is not None else None
    return reading if reading is not None else _unread(output, gen_tokens, max_gen_toks)


def score_math(output: str, gold: str, *, gen_tokens: int | None = None, max_gen_toks: int | None = None) -> Verdict:
    """MATH500: math-verify equivalence of the answer read and the gold answer (percent, degree and unit signs
    dropped on both sides). Raises as :func:`check_output` / :func:`check_gold`."""
    output, gold = check_output(output), check_gold("math", gold)
    with time_budget(TIME_BUDGET_S):
        reading = _read_math(output, gen_tokens, max_gen_toks)
        if isinstance(reading, Verdict):
            return reading
        return Verdict(reading.text, parsed_equal(gold, reading.parsed), True)


def score_gpqa(output: str, gold_letter: str, choices: list[str] | None = None, *, gen_tokens: int | None = None,
               max_gen_toks: int | None = None) -> Verdict:
    """GPQA: letter A-D; an unreadable or ambiguous answer is never given a default letter. Raises as
    :func:`check_output` / :func:`check_gold`."""
    output, gold_letter = check_output(output), check_gold("gpqa", gold_letter, choices)
    with time_budget(TIME_BUDGET_S):
        region = _region(output, gen_tokens, max_gen_toks)
        letter = final_choice(region, choices or None) if region is not None else None
        if letter is None or letter == AMBIGUOUS:
            return _unread(output, gen_tokens, max_gen_toks)
        return Verdict(letter, letter == gold_letter, True)


def verify(kind: str, output: str, gold: str | int, *, choices: list[str] | None = None,
           gen_tokens: int | None = None, max_gen_toks: int | None = None) -> Verdict:
    """One entry point: ``kind`` is ``aime``, ``math`` or ``gpqa`` (gold: the letter; ``choices``: the option texts
    in A-D order, optional).

    Raises:
        ValueError: unknown ``kind``, or an invalid gold answer (:func:`check_gold`).
        TypeError: ``output`` is not a str (:func:`check_output`).
    """
    if kind == "aime":
        return score_aime(output, gold, gen_tokens=gen_tokens, max_gen_toks=max_gen_toks)
    if kind == "math":
        return score_math(output, gold, gen_tokens=gen_tokens, max_gen_toks=max_gen_toks)
    if kind == "gpqa":
        return score_gpqa(output, gold, choices, gen_tokens=gen_tokens, max_gen_toks=max_gen_toks)
    raise ValueError(f"verify: kind must be one of {', '.join(KINDS)}, got {kind!r}")


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
