"""Reading the final answer out of a model output (the text layer; values are parsed by math-verify).

The rules, in the order they apply (docs/evals.md, "Reading rules", gives them with examples):

1. Assistant turn (:func:`assistant_turn`): cut at the first end-of-turn marker with text before it
   (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``, ``<｜end▁of▁sentence｜>``, ``</s>``, a new ``<|im_start|>``
   header other than s1's ``think``/``answer``), or, after an answer, at a line starting ``Problem:`` /
   ``Question:`` (a completion writing the next few-shot problem).
2. Answer region (:func:`split_reply`): after the last ``<|im_start|>answer``, else after the last ``</think>``,
   else the whole turn; a think phase opened and never closed is *unfinished* (:mod:`evals.scoring` decides).
3. Unicode maths becomes LaTeX/ASCII (:func:`normalise_unicode`); negated values (``not 27``, ``rather than (B)``)
   are blanked (:func:`blank_negations`).
4. Final answer (:func:`final_math_answer`): the last answer statement after the last box group that has a value
   (:func:`cue_statements`, :func:`statement_value_text`), else that box group (:func:`final_box_group`); an empty
   trailing ``Answer:`` reads nothing. It must be the last *committed* value (:func:`_committed`): when the text
   after it takes it back (a ``?`` on its sentence, a qualifier such as ``(if we ignore ...)``, a retraction word
   such as ``wait`` / ``actually`` / ``should be``), the value the retraction ends on is read, or nothing.
5. A statement's value: the leading value, or the value after its conclusion word and copula, cut at the clause
   end; math-verify's extraction (``LatexExtractionConfig(boxed_match_priority=0)``, ``ExprExtractionConfig``)
   reads it; a hedge (``27 or 28``) reads nothing; prose with a number inside is never handed to math-verify.
6. Fallback (no box, no statement): the region's final statement when it concludes (:func:`_final_statement`).
7. Normalisation for comparison (:func:`normalise_answer`): percent/degree signs and option labels dropped.
8. GPQA (:func:`final_choice`): the last of box, answer statement, choice cue, "(B) is correct" and option-only
   line; two letters in the final statement read nothing (:data:`AMBIGUOUS`); after a retraction, the one letter
   named after it (:func:`_tail_choice`), or nothing.

Only :func:`parse_latex_answer` / :func:`parse_statement` / the GPQA letter check call math-verify (imported
lazily), so this module imports fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ANSWER_DELIMITER = "<|im_start|>answer"
THINK_DELIMITER = "<|im_start|>think"

# Markers that end the assistant turn (Qwen/ChatML, GPT-2/Qwen base EOS, Llama 3, DeepSeek, sentencepiece EOS).
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<｜end▁of▁sentence｜>", "</s>")
# A new ChatML header that is not one of s1's phases starts another turn (also a bare trailing "<|im_start|>").
_NEW_HEADER = re.compile(r"<\|im_start\|>(?!think\b|answer\b)")

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A completion that goes on to write the next few-shot problem ("\n\nProblem:\n...") after its answer.
_NEXT_PROBLEM = re.compile(r"\n[ \t]*(?:#+[ \t]*)?(?:Problem|Question|Human|User)(?:[ \t]+\d+)?[ \t]*:")

# --------------------------------------------------------------------------------------------------- regions


def assistant_turn(text: str) -> tuple[str, bool]:
    """(the assistant turn, whether an end-of-turn marker was found).

    Cut at the first end-of-turn marker (rule 1). An output that starts with an end-of-turn marker has an empty
    turn (the model stopped at once; later text is the backend running on), except ``<|im_end|>`` followed by an
    ``<|im_start|>assistant`` header (the prompt's turn echoed): the turn starts after that header.
    """
    text = text or ""
    # the prompt's turn closed and the assistant header echoed: the turn starts after the header
    echoed = re.match(r"\s*<\|im_end\|>\s*<\|im_start\|>assistant[ \t]*\n?", text)
    if echoed:
        text = text[echoed.end():]
    if any(text.lstrip().startswith(marker) for marker in END_OF_TURN):
        return "", True  # the model ended its turn at once: what follows is not its reply
    cut = None
    for marker in END_OF_TURN:
        start = 0
        while True:
            i = text.find(marker, start)
            if i < 0:
                break
            if text[:i].strip():
                cut = i if cut is None else min(cut, i)
                break
            start = i + len(marker)
    for m in _NEW_HEADER.finditer(text):
        if text[:m.start()].strip():
            cut = m.start() if cut is None else min(cut, m.start())
            break
    region_end = len(text) if cut is None else cut
    nexts = [m.start() for m in _NEXT_PROBLEM.finditer(text, 0, region_end)]
    if nexts:
        # only after an answer (a box or an answer statement) does such a line begin a new problem
        answered = [b[1] for b in find_boxes(text[:nexts[-1]])] + [c[1] for c in cue_statements(text[:nexts[-1]])]
        first_answer = min(answered) if answered else None
        later = [n for n in nexts if first_answer is not None and n >= first_answer]
        if later:
            cut = later[0]
    if cut is None:
        return text, False
    return text[:cut], True


@dataclass(frozen=True)
class Reply:
    """An output split into its parts (rules 1-2)."""

    turn: str  # the assistant turn (rule 1)
    region: str  # the answer region (rule 2); the think text when the think phase is unfinished
    ended: bool  # an end-of-turn marker was seen, so the model certainly stopped by itself
    think_unfinished: bool  # a think phase was opened and never closed (s1: no <|im_start|>answer; R1: no </think>)


_STRIPPED_THINK = re.compile(r"\A\s*think[ \t]*\n")
_STRIPPED_ANSWER = re.compile(r"\n[ \t]*answer[ \t]*\n")


def split_reply(text: str) -> Reply:
    """Assistant turn and answer region of a model output (rules 1 and 2)."""
    turn, ended = assistant_turn(text or "")
    idx = turn.rfind(ANSWER_DELIMITER)
    if idx >= 0:
        return Reply(turn, turn[idx + len(ANSWER_DELIMITER):], ended, False)
    idx = turn.rfind(THINK_DELIMITER)
    if idx >= 0:
        return Reply(turn, turn[idx + len(THINK_DELIMITER):], ended, True)
    idx = turn.rfind("</think>")
    if idx >= 0:
        return Reply(turn, turn[idx + len("</think>"):], ended, False)
    idx = turn.rfind("<think>")
    if idx >= 0:
        return Reply(turn, turn[idx + len("<think>"):], ended, True)
    if _STRIPPED_THINK.match(turn):  # s1 format decoded without its special tokens
        answers = list(_STRIPPED_ANSWER.finditer(turn))
        if answers:
            return Reply(turn, turn[answers[-1].end():], ended, False)
        return Reply(turn, turn[_STRIPPED_THINK.match(turn).end():], ended, True)
    if re.match(r"\A\s*answer[ \t]*\n", turn):  # the answer phase alone, special tokens stripped
        return Reply(turn, turn[turn.index("answer") + len("answer"):], ended, False)
    return Reply(turn, turn, ended, False)


def answer_region(text: str) -> str:
    """The part of a model output that holds the final answer (rules 1-2)."""
    return split_reply(text).region


# --------------------------------------------------------------------------------------------------- boxes


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the brace closing the one at ``open_idx`` (ignores escaped braces ``\\{``, ``\\}``)."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete ``\\boxed{...}`` / ``\\fbox{...}`` (and ``\\boxed 5``), in order.

    Unclosed boxes (an output cut off by the token limit) are skipped.
    """
    found: list[tuple[int, int, str]] = []
    for command in _BOX_COMMANDS:
        start = 0
        while True:
            idx = text.find(command, start)
            if idx < 0:
                break
            j = idx + len(command)
            start = j
            k = j
            while k < len(text) and text[k] in " \t":
                k += 1
            if k < len(text) and text[k] == "{":
                end = _match_braces(text, k)
                if end is not None:
                    found.append((idx, end + 1, text[k + 1:end].strip()))
                    start = end + 1
            elif k > j and k < len(text):
                m = re.match(r"[^\s$]+", text[k:])  # "\boxed 5": the token up to whitespace or "$"
                if m:
                    found.append((idx, k + m.end(), m.group(0)))
    found.sort()
    return found


def boxed_contents(text: str) -> list[str]:
    """All complete box contents in order of appearance."""
    return [c for _, _, c in find_boxes(text)]


def last_boxed(text: str) -> str | None:
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def has_open_box(text: str) -> bool:
    """A ``\\boxed{`` whose brace never closes (the output stopped inside it)."""
    for command in _BOX_COMMANDS:
        for m in re.finditer(re.escape(command) + r"\s*\{", text):
            if _match_braces(text, m.end() - 1) is None:
                return True
    return False


# Text allowed between boxes that together form one answer: commas, "and"/"or", spacing commands, math shifts.
_BOX_JOINER = re.compile(
    r"\A(?:[\s,;$&]|\b[A-Za-z](?:_\{?\w+\}?)?\s*=|\\quad|\\qquad|\\,|\\;|\\ |\\\\"
    r"|\\text\{\s*(?:and|or|,)?\s*\}|\\(?:text|mbox)\{\s*|\band\b|\bor\b"
    r"|\\[\[\]()])*\Z")


def final_box_group(text: str) -> tuple[int, int, list[str]] | None:
    """(start, end, contents) of the last box and the boxes right before it that join it into one answer."""
    boxes = [b for b in find_boxes(text) if b[2]]
    if not boxes:
        return None
    group = [boxes[-1]]
    for b in reversed(boxes[:-1]):
        if _BOX_JOINER.match(text[b[1]:group[0][0]]):
            group.insert(0, b)
        else:
            break
    return group[0][0], group[-1][1], [c for _, _, c in group]


# --------------------------------------------------------------------------------------------------- statements

# "Answer:", "**Answer:**", "Final Answer:", "the answer is", "The final answer is", "The correct answer is",
# "Final answer - B", "answer is:". The cue must end with ":" / "is" / "-" so that "answer" in prose is no cue.
_CUE = re.compile(
    r"(?i:\b(?:final\s+answer|(?:the\s+)?(?:correct|final|right|best)?\s*answer)(?:\s+to\s+the\s+question)?)"
    r"(?:\*\*|__)?\s*(?:(?i:is)\b\s*:?|:|\s-|\s—|\s=)(?:\*\*|__)?",
)
# "If the question meant mass, the answer is (B)": a conditional sentence states no answer
_CONDITIONAL = re.compile(r"(?i)\b(?:if|unless|suppose|supposing|assuming|had|were)\b")
_CHECKING = re.compile(r"(?i)\b(?:check|checking|verify|verifying|confirm|confirming|test|testing|plug|plugging)\b"
                       r"|\b(?:our|your|this|that|these|their)\s*\Z")
# a heading on its own line: "### Final Answer", "**Answer**" (the answer is on the next line)
_HEADING_CUE = re.compile(r"(?im)^[ \t]*(?:#+[ \t]*|\*\*|__)?[ \t]*(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*:?"
                          r"[ \t]*(?:\*\*|__)?[ \t]*(?=\n)")
_MINERVA_TAIL = re.compile(r"(?i)\.?\s*I\s+hope\s+(?:it|this)\s+is\s+correct.*", re.DOTALL)


def _conditional(text: str, pos: int) -> bool:
    """The sentence holding ``pos`` opens with a condition before it ("If ..., the answer would be (B)"), or is
    about checking an answer rather than giving one ("We may check our answer: ...")."""
    start = max(text.rfind("\n", 0, pos), *(text.rfind(p, 0, pos) for p in (". ", "! ", "? ")))
    before = _mask_math(text[start + 1:pos])
    return bool(_CONDITIONAL.search(before) or _CHECKING.search(before))


def cue_statements(text: str) -> list[tuple[int, int, str]]:
    """(cue start, statement end, statement text after the cue) for every answer cue, in order.

    The statement runs to the end of the cue's line; a cue that ends its line takes the next non-empty line.
    """
    out = []
    cues = sorted(list(_CUE.finditer(text)) + list(_HEADING_CUE.finditer(text)), key=lambda m: m.start())
    for m in cues:
        if _conditional(text, m.start()):
            continue
        rest_start = m.end()
        eol = text.find("\n", rest_start)
        eol = len(text) if eol < 0 else eol
        body = text[rest_start:eol]
        if not body.strip(" \t*_:"):
            nxt = re.match(r"(?:[ \t]*\n)+([^\n]*)", text[eol:])
            if nxt:
                body = nxt.group(1)
                eol = eol + nxt.end()
                # a display block that starts on the next line: take it whole
                if body.strip() in ("$$", "\\["):
                    close = "$$" if body.strip() == "$$" else "\\]"
                    j = text.find(close, eol)
                    if j >= 0:
                        body = body.strip() + text[eol:j] + close
                        eol = j + len(close)
        out.append((m.start(), eol, body))
    return out


def _mask_math(s: str) -> str:
    """``s`` with every math span ($..$, $$..$$, \\(..\\), \\[..\\], \\boxed{..}) replaced by ``#`` of equal length,
    so that words and punctuation can be searched outside math only."""
    out = list(s)
    for pat in (r"\$\$.*?\$\$", r"(?<!\\)\$.*?(?<!\\)\$", r"\\\(.*?\\\)", r"\\\[.*?\\\]"):
        for m in re.finditer(pat, "".join(out), re.DOTALL):
            for i in range(m.start(), m.end()):
                out[i] = "#"
    masked = "".join(out)
    for start, end, _ in find_boxes(masked):
        for i in range(start, end):
            out[i] = "#"
    return "".join(out)


_COPULA = re.compile(r"(?i)(?:\b(?:is|are|was|equals|equal\s+to|would\s+be|will\s+be|becomes|gives|yields|means|"
                     r"obtain|get|find|have|has|takes|costs|lasts|measures|weighs)\b\s*(?:that\b)?\s*:?|=|\bto\s+be\b)")
_CLAUSE = re.compile(r"(?i)(?:[.;!?](?=\s|$)|,?\s\b(?:when|where|for|since|because|as|if|which|with|given|so|but|"
                     r"and\s+(?:the|this|that|so|we|it)|assuming|provided|after|before|from|in\s+(?:the|this))\b"
                     r"|\s\((?=(?-i:[a-z])))")
_NEGATED = re.compile(
    r"(?i),?\s*\(?\b(?:not|rather\s+than|instead\s+of|and\s+not|but\s+not)\s+"
    r"(\$[^$]*\$|\\\(.*?\\\)|\\boxed\{[^{}]*\}|\*\*[^*]+\*\*|\([A-D]\)|[A-D]\b|[-+]?[\d.,/]+(?:\s*%)?)\)?")
_HEDGE = re.compile(r"(?i)\b(?:or|maybe|perhaps|possibly|either)\b|/\s*(?=[A-D]\b)")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")


def _strip_statement(s: str) -> str:
    s = _MINERVA_TAIL.sub("", s)
    s = s.replace("**", " ").replace("__", " ")
    return s.strip()


_LEADING_VALUE = re.compile(r"(?:−|\$|\\\(|\\\[|\\\$|[-+]?\\(?:[A-Za-z]+|\{)|[-+]?[(\[]?[-+]?\.?\d"
                            r"|[A-Za-z](?:_\{?\w+\}?)?\s*=)")
# words that may stand between a copula and its value ("is exactly 5", "is then $x = 2$", "not 27 but 28")
_FILLER = re.compile(r"(?i)\A(?:\s*(?:but|the|exactly|precisely|just|simply|equal\s+to|given\s+by|approximately|about|"
                     r"roughly|around|then|therefore|thus|now|indeed|actually|only|still|also|likely|probably|clearly|"
                     r"definitely|certainly|surely|most\s+likely)\b|\s*[:,])*\s*")


def leads_with_value(text: str) -> bool:
    """The text starts with a value (after filler words), or is math only: math-verify may read it. Prose with a
    number inside ("divisible by 7", "the 50 numbers") is never handed to math-verify's anywhere-in-text search."""
    t = text[_FILLER.match(text).end():]
    return bool(_LEADING_VALUE.match(t)) or is_math_only(t)


# words after which the value comes ("so the probability is 3/5", "which implies $x = 3/2$")
_CONCLUSION = re.compile(r"(?i)\b(?:so|thus|therefore|hence|i\.e\.|that\s+is|which\s+means|this\s+means|meaning|"
                         r"(?:which\s+)?(?:implies|gives|yields)(?:\s+that)?|(?:for\s+)?a\s+total\s+of|in\s+total)\b,?")


def statement_value_text(s: str) -> str | None:
    """The part of an answer statement that holds the value (rule 5 of the module docstring, before math-verify).

    Drops Minerva's tail and negated values. A statement that starts with a value keeps it; otherwise the text
    after the last conclusion word (``so``, ``thus``, ``therefore`` ...) and then after the copula (``is``, ``are``,
    ``equals``, ``=``, outside math; the last one of a chain in one clause) is kept. Either is cut at the end of
    the sentence / the first clause word. None if a hedge (``or``, ``maybe``) joins values outside math.
    """
    s = _NEGATED.sub("", _strip_statement(s)).lstrip(" \t:*_")  # never strip "-": it is the sign of the value
    if not _LEADING_VALUE.match(s):
        masked = _mask_math(s)
        k = 0
        for m in _CONCLUSION.finditer(masked):
            k = m.end()
        c = _COPULA.search(masked, k)
        while c is not None:
            nxt = _COPULA.search(masked, c.end())
            boundary = _CLAUSE.search(masked, c.end())
            if nxt is None or (boundary is not None and boundary.start() < nxt.start()):
                break
            c = nxt
        cut = c.end() if c is not None and s[c.end():].strip(" \t:.*") else k
        s = s[cut:].lstrip(" \t:*_,")
    masked = _mask_math(s)
    # cut at the end of the sentence / the first clause word outside math (not at a decimal point)
    c = _CLAUSE.search(masked, 1)
    if c:
        s, masked = s[:c.start()], masked[:c.start()]
    s = s.strip().strip(":").strip()
    # "or" between two math spans is a list that math-verify joins into a set; elsewhere it is a hedge
    if _HEDGE.search(re.sub(r"(?<!#)#+\s*,?\s*\bor\b\s*#+", "#", masked)):
        return None
    return s or None


def is_math_only(s: str) -> bool:
    """No English word (3+ letters) outside math spans and LaTeX commands: the text can be read as LaTeX."""
    t = re.sub(r"\\(?:text|mathrm|textbf|mbox|operatorname)\{[^{}]*\}", " ", s)
    return not _WORD.search(_mask_math(t))


# --------------------------------------------------------------------------------------------------- values

_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\(?:text|mbox|mathrm)\{\s*percent\s*\}|\s+percent\b)")
_DEGREE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\text\{\s*°\s*\}|\^\{\\text\{o\}\})")


def normalise_answer(s: str) -> str:
    """Unit-free LaTeX of an answer: percent and degree signs dropped (``35\\%`` -> ``35``, ``30^\\circ`` -> ``30``),
    ``\\displaystyle``, ``\\left``/``\\right`` and a trailing full stop removed, thousands separators joined when the
    whole answer is one number (``20,736`` -> ``20736``). Text units (``\\text{ cm}``) are left to math-verify's
    unit normalisation."""
    t = s.strip()
    t = re.sub(r"\\(?:displaystyle|textstyle|dfrac)", lambda m: "\\frac" if m.group(0) == "\\dfrac" else "", t)
    t = _PERCENT.sub("", t)
    t = _DEGREE.sub("", t)
    # an AMC-style option label before the value: "\\textbf{(B) }25" -> "25"
    t = re.sub(r"\A\s*(?:\\text(?:bf)?\{\s*\(([A-E])\)\s*\}|\(([A-E])\))\s*(?=\S)", "", t)
    t = t.strip().rstrip(".").strip()
    if t.startswith("$") and t.endswith("$"):
        t = t.strip("$").strip()
    # "0,125" is a decimal comma, not a thousands separator: the first group never starts with 0
    if re.fullmatch(r"[-+]?[1-9]\d{0,2}(?:(?:\{,\}|,\\!|,)\d{3})+(?:\.\d+)?", t):
        t = re.sub(r"\{,\}|,\\!|,", "", t)
    return t


def _mv():
    try:
        import math_verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("math-verify is required for scoring; install it with `pip install \"lm-eval[math]\"`") from e
    return math_verify


# Answers are short: a candidate longer than this is no answer, and math-verify never sees it (its LaTeX parser
# takes seconds to minutes on expressions with thousands of terms).
MAX_PARSE_CHARS = 600
# Total math-verify time one output may use (seconds); see :func:`time_budget`.
_deadline: list[float] = []


class time_budget:  # noqa: N801 - used as a context manager: ``with time_budget(10): ...``
    """Bound the total math-verify time of one output: inside the block every parse/verify call gets at most the
    seconds left (each at most 5 s), and none is made once they are spent (the candidate then reads as nothing)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        import time

        _deadline.append(time.monotonic() + self.seconds)
        return self

    def __exit__(self, *exc):
        _deadline.pop()
        return False


def mv_timeout() -> int | None:
    """Seconds the next math-verify call may take (1-5), or None when the budget is spent."""
    if not _deadline:
        return 5
    import math
    import time

    left = _deadline[-1] - time.monotonic()
    return None if left <= 0 else max(1, min(5, math.ceil(left)))


def mv_parse(text: str, configs) -> list:
    """``math_verify.parse`` with the length cap (:data:`MAX_PARSE_CHARS`) and the time budget; [] if refused."""
    timeout = mv_timeout()
    if timeout is None or len(text) > MAX_PARSE_CHARS + 20:
        return []
    return _mv().parse(text, configs, parsing_timeout=timeout)


@lru_cache(maxsize=1)
def _configs():
    mv = _mv()
    return ([mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()],
            [mv.LatexExtractionConfig(boxed_match_priority=0)])


@lru_cache(maxsize=8192)
def parse_latex_answer(latex: str) -> tuple:
    """math-verify parse of a bare answer (box content or gold), after :func:`normalise_answer`; () if unreadable.

    The answer is wrapped in ``\\boxed{}`` so that math-verify's boxed extraction reads it whole.
    """
    t = normalise_answer(latex)
    if not t:
        return ()
    parsed = mv_parse("\\boxed{" + t + "}", _configs()[1])
    return tuple(p for p in parsed if not isinstance(p, str)) and tuple(parsed)


_UNITS = (r"(?:mm|cm|dm|m|km|in|inch|inches|ft|feet|yd|yards|mi|miles|g|kg|mg|lb|lbs|oz|s|sec|ms|min|h|hr|hrs|L|mL|"
          r"ml|cc|units?|sq|cents?|dollars?|degrees?|deg|rad|radians?|mph|kph|km/h|m/s)\b")


@lru_cache(maxsize=8192)
def parse_statement(text: str) -> tuple:
    """math-verify extraction (LaTeX and plain expressions, anchors and all) over a statement's value text."""
    t = _PERCENT.sub("", text)
    t = _DEGREE.sub("", t)
    plain = re.sub(r"\$[^$]*\$|\\\(.*?\\\)", " ", t)
    if re.search(r"\d[ \t]+\d", plain) and not re.search(r"(?<![\d.])\d{1,3}(?:[ \t]\d{3})+(?![\d.])", plain):
        return ()  # "20 4": two numbers side by side, not one (math-verify would join them into 204)
    unit = re.fullmatch(r"\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*" + _UNITS + r"(?:\^\{?[23]\}?)?\.?\s*", t)
    if unit:  # "12 cm^2": a number and a unit (never "2 pi", "3 i": those are values)
        t = unit.group(1)
    if "$" not in t and "\\(" not in t and is_math_only(t):
        # bare LaTeX ("3\\sqrt{2}", "x^2 + 1", "2 pi"): read it whole as math, not its first number
        latex = re.sub(r"(?<![\\A-Za-z])pi(?![A-Za-z])", r"\\pi ", normalise_answer(t))
        parsed = mv_parse("$" + latex + "$", _configs()[0])
        if any(not isinstance(p, str) for p in parsed):
            return tuple(parsed)
    parsed = mv_parse(t, _configs()[0])
    if any(not isinstance(p, str) for p in parsed):
        return tuple(parsed)
    if is_math_only(text):  # "x^2 + 1", "p - q" written without $ signs
        return parse_latex_answer(text.strip().strip("$"))
    return ()


def _written(parsed: tuple, fallback: str) -> str:
    """The answer as math-verify extracted it (the string it returns after the parsed objects)."""
    written = parsed[-1] if parsed and isinstance(parsed[-1], str) else fallback
    return written.strip().rstrip(".").strip() or fallback


@dataclass(frozen=True)
class Reading:
    """A value read from the answer region."""

    text: str  # the answer as written (box content, or the value text of a statement)
    parsed: tuple  # math-verify's parse of it (sympy objects first, then its string), never empty
    source: str  # "box", "statement" or "final statement"


def _box_reading(contents: list[str]) -> Reading | None:
    if len(contents) == 1 and re.search(r"(?i)\banswer\b|\s(?:is|are)\s", _mask_math(contents[0])):
        # a whole sentence in a box ("\boxed{\text{The answer is } 27}"): read it as a statement
        value = statement_value_text(re.sub(r"\\text\{([^{}]*)\}", r"\1", contents[0]))
        parsed = parse_statement(value) if value else ()
        return Reading(value, parsed, "box") if parsed else None
    text = ", ".join(normalise_answer(c) for c in contents)
    parsed = parse_latex_answer(text)
    return Reading(text, parsed, "box") if parsed else None


def _before_copula(body: str) -> str | None:
    """The statement up to its first copula outside math ("$31$ is the answer" -> "$31$")."""
    s = _NEGATED.sub("", _strip_statement(body))
    k = 0
    for c in _CONCLUSION.finditer(_mask_math(s)):
        k = c.end()
    s = s[k:]
    m = _COPULA.search(_mask_math(s))
    if not m or not s[:m.start()].strip():
        return None
    head = s[:m.start()].strip()
    # only a value on its own ("$31$ is the answer", "x = 5 is the solution"), never a number out of prose
    return statement_value_text(head) if is_math_only(head) and re.search(r"[\d$\\]", head) else None


def _leading_value(text: str) -> str:
    """The value a statement leads with: cut at the first English word outside math ("5 apples and 3 oranges" ->
    "5", "$84$ square units" -> "$84$"), so that math-verify's rightmost-match search cannot pick a later number.
    A unit word right after a number is kept for :func:`parse_statement`; "and"/"or" between values are kept."""
    masked = _mask_math(re.sub(r"\\[A-Za-z]+(?:\{[^{}]*\})?", lambda m: "#" * len(m.group(0)), text))
    for m in re.finditer(r"(?<![A-Za-z])[A-Za-z]{2,}", masked):
        if m.group(0).lower() in ("and", "or", "pi", "sqrt", "ln", "log", "sin", "cos", "tan", "mod"):
            continue
        if re.fullmatch(_UNITS, m.group(0)) and not text[m.end():].strip(" .,"):
            break  # "15 feet": the unit ends the value
        cut = text[:m.start()].rstrip(" ,;")
        cut = re.sub(r"(?i)\s*\band\s*\Z", "", cut)
        return cut if cut.strip() else text
    return text


# "so our answer is correct": a statement about the answer, not an answer
_VERDICT_WORDS = re.compile(r"(?i)(?:not\s+|indeed\s+|thus\s+|also\s+)?(?:correct|right|wrong|incorrect|valid|invalid|"
                            r"reasonable|plausible|consistent|confirmed|verified|checked|clear|obvious|unique|"
                            r"as\s+follows|below|above|boxed|shown|given|the\s+same|same|unchanged|yes|no|true|"
                            r"false)\b")


# "The final answer is unknown yet", "still undetermined": a status, not a word answer
_STATUS_WORDS = re.compile(r"(?i)\b(?:unknown|yet|unclear|undetermined|uncertain|unsure|pending|tbd|missing|not|"
                           r"still|pending|unsolved|incomplete)\b")
_UNITS_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen").split()
_TENS_WORDS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
               "ninety": 90}


def _number_word(words: str) -> int | None:
    """``three`` -> 3, ``twenty-one`` -> 21 (0-99 written as words, the whole value); else None."""
    w = words.strip().rstrip(".").lower()
    if w in _UNITS_WORDS:
        return _UNITS_WORDS.index(w)
    m = re.fullmatch(r"([a-z]+)(?:[- ]([a-z]+))?", w)
    if m and m.group(1) in _TENS_WORDS and (m.group(2) is None or m.group(2) in _UNITS_WORDS[1:10]):
        return _TENS_WORDS[m.group(1)] + (_UNITS_WORDS.index(m.group(2)) if m.group(2) else 0)
    return None


def _statement_reading(body: str, source: str = "statement") -> Reading | None:
    boxes = final_box_group(body)
    if boxes:
        return _box_reading(boxes[2])
    value = statement_value_text(body)
    if value is None:
        return None
    for text in (value, _before_copula(body)):
        if not text or not leads_with_value(text):
            continue
        text = _leading_value(text[_FILLER.match(text).end():])
        parsed = parse_statement(text)
        if parsed:
            return Reading(_written(parsed, text), parsed, source)
    words = value.strip().strip("$").strip()
    number = _number_word(words)
    if number is not None:  # "The answer is three."
        parsed = parse_latex_answer(str(number))
        return Reading(str(number), parsed, source) if parsed else None
    short = len(_strip_statement(body).split()) <= 5
    if short and 0 < len(words.split()) <= 4 and re.fullmatch(r"[A-Za-z][A-Za-z \-']*", words) \
            and not _VERDICT_WORDS.match(words) and not re.search(r"(?i)\banswer", words) \
            and _FILLER.match(words).end() == 0 and not _STATUS_WORDS.search(words):
        # a short word answer ("Evelyn", "odd"): compared as \text{...} like math-verify does with text golds
        parsed = parse_latex_answer("\\text{" + words + "}")
        if parsed:
            return Reading("\\text{" + words + "}", parsed, source)
    return None


_CONCLUDES = re.compile(r"(?i)\b(?:so|thus|therefore|hence|finally|total|altogether|overall|result|answer|find|found|"
                        r"have|has|implies|is|are|equals|gives|get|obtain|becomes)\b|=")
_EXPLORES = re.compile(r"(?i)\b(?:let|let's|check|try|suppose|assume|assuming|if|wait|maybe|perhaps|might|could|"
                       r"note|notice|recall|observe|remark|"
                       r"should|guess|hmm|verify|consider|compute|calculate)\b|\?")


def _final_statement(region: str) -> Reading | None:
    """Rule 6: the final statement of a region that has no box and no answer statement."""
    text = region.rstrip()
    if not text:
        return None
    m = re.search(r"(\$\$(?:(?!\$\$).)+\$\$|\\\[(?:(?!\\\[).)+\\\])[\s.]*\Z", text, re.DOTALL)
    if m:  # a display block ends the region (the last one only: no "$$" / "\[" inside)
        lead_in = text[:m.start()]
        lead_in = lead_in[max(lead_in.rfind(". "), lead_in.rfind("\n\n")) + 1:]
        if _EXPLORES.search(_mask_math(lead_in)):
            return None  # "Let me check: $$2 + 2 = 4.$$"
        parsed = mv_parse(m.group(1), _configs()[0])
        if any(not isinstance(p, str) for p in parsed):
            return Reading(_written(tuple(parsed), m.group(1)), tuple(parsed), "final statement")
        return None
    last_line = text.split("\n")[-1].strip()
    bare = last_line.strip("*_ ").rstrip(".").strip()
    if bare and is_math_only(bare) and re.search(r"\d", bare):  # a last line that is only a value
        parsed = parse_statement(bare)
        return Reading(_written(parsed, bare), parsed, "final statement") if parsed else None
    if not re.search(r"[.!)\]$]\s*\Z", last_line):
        return None  # no sentence end: the text stops mid-thought
    masked = _mask_math(last_line)
    # the last sentence of the last line; a full stop that closes a math span ("... = 0.\]Hence") ends one too
    ends = [e.end() for e in re.finditer(r"[.!?](?=\s+[A-Z])", masked)]
    ends += [e.end() for e in re.finditer(r"[.!?]\s*(?:\$\$|\$|\\\]|\\\))\s*(?=[A-Z])", last_line)]
    ends.sort()
    start = ends[-1] if ends else 0
    sentence, sentence_masked = last_line[start:].strip(), masked[start:]
    bold = re.findall(r"\*\*([^*\n]+)\*\*", sentence)
    if len(bold) == 1 and not _EXPLORES.search(sentence_masked) and not _HEDGE.search(sentence_masked):
        # "Therefore, the walk takes **204** minutes.": the one bold value of the final sentence, the only number
        outside = sentence.replace("**" + bold[0] + "**", " ")
        inner = bold[0].strip()
        inner = inner[_FILLER.match(inner).end():]
        if not re.search(r"\d", outside) and leads_with_value(inner):
            text = _leading_value(inner).rstrip(" .")
            parsed = parse_statement(text)
            if parsed:
                return Reading(_written(parsed, text), parsed, "final statement")
    if not _CONCLUDES.search(sentence_masked) or _EXPLORES.search(sentence_masked):
        return None
    if not (_COPULA.search(sentence_masked) or _CONCLUSION.search(sentence_masked)):
        return None  # "Let x = 3." concludes nothing
    return _statement_reading(sentence, "final statement")


def blank_negations(text: str) -> str:
    """``text`` with negated values (``not 27``, ``(not $\\boxed{6}$)``, ``rather than (B)``) blanked out, positions
    kept, so that a value a reply rules out is never read as its answer."""
    return _NEGATED.sub(lambda m: " " * len(m.group(0)), text)


# ----------------------------------------------------------------------------------------- unicode, retractions

_SUPERSCRIPT = {"⁰": "0", "¹": "1", "²": "2", "³": "3", "⁴": "4", "⁵": "5", "⁶": "6", "⁷": "7", "⁸": "8", "⁹": "9",
                "⁻": "-", "⁺": "+"}
_VULGAR = {"½": (1, 2), "⅓": (1, 3), "⅔": (2, 3), "¼": (1, 4), "¾": (3, 4), "⅕": (1, 5), "⅖": (2, 5), "⅗": (3, 5),
           "⅘": (4, 5), "⅙": (1, 6), "⅚": (5, 6), "⅐": (1, 7), "⅛": (1, 8), "⅜": (3, 8), "⅝": (5, 8), "⅞": (7, 8),
           "⅑": (1, 9), "⅒": (1, 10)}
_SYMBOLS = {"−": "-", "×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "π": "\\pi ", "∞": "\\infty ", "≤": "\\le ",
            "≥": "\\ge ", "≠": "\\ne "}
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")


def normalise_unicode(text: str) -> str:
    r"""Unicode maths as LaTeX, then NFKC: zero-width characters dropped, superscripts ``x²`` -> ``x^{2}`` (before
    NFKC, which would make ``x2`` of it), vulgar fractions ``½`` -> ``\frac{1}{2}`` (``1½`` -> ``\frac{3}{2}``),
    ``√2`` / ``√(x+1)`` -> ``\sqrt{...}``, ``−×÷·π∞≤≥≠`` -> their LaTeX, fullwidth digits and letters (``２０４``)
    -> ASCII by NFKC. ASCII text is returned unchanged."""
    if text.isascii():
        return text
    import unicodedata

    t = _INVISIBLE.sub("", text)
    t = re.sub("[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+", lambda m: "^{" + "".join(_SUPERSCRIPT[c] for c in m.group(0)) + "}", t)

    def vulgar(m):
        a, b = _VULGAR[m.group(2)]
        if m.group(1):  # a mixed number: 1½ = 3/2
            a += int(m.group(1)) * b
        return f"\\frac{{{a}}}{{{b}}}"

    t = re.sub("(\\d+)?([" + "".join(_VULGAR) + "])", vulgar, t)
    t = re.sub(r"√\s*(?:\(([^()]*)\)|\{([^{}]*)\}|(\d+(?:\.\d+)?|[A-Za-z]))",
               lambda m: "\\sqrt{" + next(g for g in m.groups() if g is not None) + "}", t)
    t = t.replace("√", "\\sqrt ")
    t = "".join(_SYMBOLS.get(c, c) for c in t)
    return unicodedata.normalize("NFKC", t)


# Words after an answer that take it back ("Wait, that's wrong", "actually it's 4", "On second thought, (C)",
# "it should be 228", "we double counted"). Searched outside math only. Verification words alone ("let me
# check") are not here: a check that confirms keeps the answer.
_RETRACT = re.compile(
    r"(?i)\b(?:wait|actually|hmm+|oops|nope|no(?=\s*[,.:;!—–-]|\s+wait\b)|wrong|incorrect|mistaken|mistakes?|errors?|"
    r"erroneous|should\s+(?:be|have\s+been|read)|instead|on\s+second\s+thought|on\s+reflection|upon\s+reflection|"
    r"however|correction|correcting|redo|redoing|recompute|recomputing|recalculat\w*|reconsider\w*|re-?evaluat\w*|"
    r"not\s+(?:right|correct|quite)|isn[’']?t\s+(?:right|correct)|doesn[’']?t\s+(?:work|match|fit|hold)|"
    r"contradict\w*|ignores?|ignoring|double[\s-]count\w*|over-?count\w*|under-?count\w*|forgot|missed|"
    r"miscount\w*|miscalculat\w*|typo|scratch\s+that|hold\s+on|not\s+final)\b")
# A qualifier right after the value, in its sentence: "204 (if we ignore the shop)", "204 (approximately; exact
# value 204.5)", "204 minus the 24 minutes, i.e., 180", "(B) is incorrect": the value is not the committed answer.
_QUALIFIED = re.compile(
    r"(?i)\A[\s$*_)\]}]*(?:[(,;:—–]\s*|-\s+)*\(?\s*(?:if|unless|assuming|provided|approx\w*|roughly|about|around|"
    r"nearly|almost|rounded|ignoring|excluding|without|not\s+counting|minus|plus|divided\s+by|"
    r"exact\w*|i\.e\.|that\s+is\b|(?:is|was|seems|looks)\s+(?:not\b|incorrect|wrong|false|ruled|eliminated|out\b)|"
    r"isn[’']?t\b|can[’']?t\b|cannot\b)")
_TRAILING_VALUE = re.compile(
    r"(\$\$[^$]+\$\$|\$[^$]+\$|\\\(.+?\\\)|\\\[.+?\\\]|\*\*[^*\n]+\*\*|[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?)"
    r"(?:\s+[A-Za-z]+){0,3}[\s.!)\]*]*\Z", re.DOTALL)


# what introduces the value a correction commits to: "it's 228", "should be 228", "to get 203", "i.e., 180",
# "exact value 204.5", "Including it: 228", "= 228", "giving $\frac12$"
_COMMITS = re.compile(r"(?i)(?:\b(?:is|are|be|was|were|get|gets|got|gives|giving|yields|equals|makes|takes|obtain|find|"
                      r"becomes|exactly|i\.e\.|namely|(?:value|total|answer|result)(?:\s+of)?)|[=:]|[’']s)[\s,*_]*\Z")


# the rest of the value's own clause makes it hypothetical: "204 is what we'd get without the shop"
_HYPOTHETICAL = re.compile(r"(?i)\b(?:if|unless|assuming|suppose|supposing|without|ignoring|excluding|would|could|"
                           r"might)\b|[’']d\b")


def _retracted(after: str) -> bool:
    """The text after an answer (from the end of its value) takes it back: a question mark on the answer's sentence,
    a qualifier right after the value, or a retraction word anywhere after it (:data:`_RETRACT`)."""
    masked = _mask_math(after)
    clause = re.split(r"[,.!?;:](?=\s|\Z)|\n|\s(?:and|so|but)\s", masked, maxsplit=1)[0]
    return bool(re.match(r"[\s$*_)\]}.]*\?", after) or _QUALIFIED.match(after) or _HYPOTHETICAL.search(clause)
                or _RETRACT.search(masked))


def _trailing_value(after: str) -> Reading | None:
    """The value a retraction ends on ("... Actually no, it's 228.", "... we subtract 1 to get 203."): the value
    that ends the last sentence (at most three words such as a unit after it); None when there is none, when that
    sentence hedges or asks, or when the value is the tail of an expression ("2 + 3.")."""
    t = after.rstrip()
    masked = _mask_math(t)
    cuts = [m.end() for m in re.finditer(r"[.!?;](?=\s)|\n|(?<=[a-z]):\s", masked)]
    last = t[cuts[-1]:] if cuts else t
    last_masked = masked[len(t) - len(last):]
    if not last.strip() or _HEDGE.search(last_masked) or "?" in last_masked or _RETRACT.search(last_masked) and \
            not re.search(r"[\d$]", last):
        return None
    m = _TRAILING_VALUE.search(last)
    if not m:
        return None
    before = last[:m.start()].rstrip()
    if before and before[-1] in "+-*/^×":
        return None
    if not _COMMITS.search(before) or _CONDITIONAL.search(last_masked):
        return None  # "that can't be right since the area must exceed 15": a value, but no answer given
    value = m.group(1).strip("*").strip()
    boxes = final_box_group(value)
    if boxes:
        return _box_reading(boxes[2])
    parsed = parse_statement(value)
    return Reading(_written(parsed, value), parsed, "correction") if parsed else None


def _value_end(region: str, eol: int, body: str, reading: Reading) -> int:
    """Where, in ``region``, the value of the statement ``body`` (which ends at ``eol``) ends; ``eol`` if unknown."""
    start = max(0, eol - len(body))
    if region[start:eol] != body:
        return eol
    group = final_box_group(body)
    if group:
        return start + group[1]
    for value in (reading.text, statement_value_text(body)):
        if not value:
            continue
        i = body.find(value)
        if i >= 0:
            return start + i + len(value)
    return eol


def _past_math(region: str, end: int) -> int:
    """``end`` moved past the closing delimiter of the math span it lies in (``$\boxed{3}$.``: after the ``$``)."""
    before = region[:end]
    if (before.count("$") - before.count("\\$")) % 2:
        j = region.find("$", end)
        return end if j < 0 else j + (2 if region.startswith("$$", j) else 1)
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if before.rfind(opener) > before.rfind(closer):
            j = region.find(closer, end)
            return end if j < 0 else j + 2
    return end


def _committed(region: str, reading: Reading | None, end: int) -> Reading | None:
    """The reading, unless the text after it takes it back; then the value the retraction ends on, or None."""
    if reading is None:
        return None
    after = region[_past_math(region, end):]
    if not _retracted(after):
        return reading
    return _trailing_value(after)


def final_math_answer(region: str, allow_fallback: bool = True) -> Reading | None:
    """The final answer of a region (rules 3-6), or None: the last committed value (rule 6, :func:`_committed`)."""
    region = blank_negations(normalise_unicode(region))
    group = final_box_group(region)
    box_end = group[1] if group else -1
    statements = [s for s in cue_statements(region) if s[0] >= box_end]
    if statements and not statements[-1][2].strip(" \t*_:") and not region[statements[-1][1]:].strip():
        return None  # the region ends on an empty "Answer:": the model never wrote its answer
    for start, end, body in reversed(statements):
        reading = _statement_reading(body)
        if reading is not None:
            return _committed(region, reading, _value_end(region, end, body, reading))
        if _HEDGE.search(_mask_math(_strip_statement(body))) and statement_value_text(body) is None:
            return None  # the last statement hedges between answers: nothing is read
    if group:
        return _committed(region, _box_reading(group[2]), group[1])
    if allow_fallback:
        return _final_statement(region)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a model output as written (rules 1-5); None if nothing can be read."""
    reply = split_reply(text or "")
    reading = final_math_answer(reply.region)
    return reading.text if reading else None


# --------------------------------------------------------------------------------------------------- GPQA letters

_LETTERS = "ABCD"
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|boxed)\s*\{([^{}]*)\}")
AMBIGUOUS = "ambiguous"


def _strip_latex_wrappers(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    return s


def _normalise_text(s: str) -> str:
    s = _strip_latex_wrappers(s)
    s = s.replace("$", "")
    return re.sub(r"\s+", " ", s).strip().rstrip(".").lower()


# an option letter written as an option: "(C)", "C)", "**C**", "[C]", "C." / "C:" / "C," / "C" on its own
_OPTION = re.compile(r"(?<![A-Za-z'])[\(\[]?([A-D])(?:[\)\]]|(?![A-Za-z'\-]))")


# a letter leading a statement: "(C)", "C.", "C 4.2 eV", "Option C"; "A noble gas" is the article, not option A
_LEAD_LETTER = re.compile(r"\s*(?i:option|choice)?\s*(?:[\(\[]([A-D])[\)\]]|([A-D])(?:[\)\]\.:,]|\Z|\s(?!\s*[a-z])))")


def parse_choice_letter(answer: str | None, choices: list[str] | None = None) -> str | None:
    """Map a box content or a statement value to one of ``A``-``D``; None if it cannot be read (or names two).

    Accepts ``C``, ``(C)``, ``C)``, ``C.``, ``\\text{C}``, ``**C**``, ``Option C``, ``C) <choice text>``, and,
    when ``choices`` is given, the exact text of one choice. A lowercase single letter is accepted only on its
    own (so that words such as "a" in a sentence never count).
    """
    letter = _choice_letter(answer, choices)
    return None if letter == AMBIGUOUS else letter


def _choice_letter(answer: str | None, choices: list[str] | None) -> str | None:
    if answer is None:
        return None
    s = _strip_latex_wrappers(_strip_statement(answer)).strip()
    s = s.strip("*_$ ").strip()
    if not s:
        return None
    m = re.fullmatch(r"(?i:option|choice)?\s*[\(\[]?\s*([A-Da-d])\s*[\)\]]?[.:]?", s)
    if m:
        return m.group(1).upper()
    s = _NEGATED.sub("", s)
    masked = _mask_math(s)
    c = _CLAUSE.search(masked, 1)
    head = s[:c.start()] if c else s
    # the statement's head names option letters: exactly one distinct -> that letter; more -> ambiguous
    letters = {m.group(1) for m in _OPTION.finditer(head)}
    if len(letters) > 1:
        return AMBIGUOUS
    rest = s[len(head):]
    hedge = re.match(r"[\s,;]*(?i:but|or|although|though|however|yet|unless)\b", rest)
    if hedge and letters and {m.group(1) for m in _OPTION.finditer(rest.split("\n")[0])} - letters:
        return AMBIGUOUS  # "(B), but (C) is also plausible"
    if len(letters) == 1:
        head = head[_FILLER.match(head).end():]
        lead = _LEAD_LETTER.match(head)
        if lead is None:
            # "The correct option is (A)": the letter right after the last copula of the head
            cop = list(_COPULA.finditer(_mask_math(head)))
            lead = _LEAD_LETTER.match(head[cop[-1].end():]) if cop else None
            head = head[cop[-1].end():] if cop else head
        if lead:
            # math-verify's own string extraction must agree on the letter (StringExtractionConfig)
            mv = _mv()
            got = mv_parse("Answer: " + re.sub(r"[\(\)\[\]]", " ", head), [
                mv.StringExtractionConfig(strings=tuple(_LETTERS), try_extract_without_anchor=False,
                                          lowercase=False)])
            letter = lead.group(1) or lead.group(2)
            if got and got[0] == letter:
                return letter
    if choices:
        norm = _normalise_text(s)
        hits = [i for i, ch in enumerate(choices) if _normalise_text(ch) == norm]
        if len(hits) == 1:
            return _LETTERS[hits[0]]
    return None


def _bare_letter_line(line: str, choices: list[str] | None) -> str | None:
    """A line that is only an option: ``**C**``, ``(D)``, ``C``, ``\\boxed{C}``, or ``(D) <the text of D>``."""
    s = _strip_latex_wrappers(line).replace("**", "").replace("__", "").strip().strip("*_$#> ").strip()
    m = re.fullmatch(r"(?i:option|choice)?\s*[\(\[]?([A-D])[\)\]]?[.]?", s)
    if m:
        return m.group(1)
    m = re.match(r"[\(\[]?([A-D])[\)\]\.:]\s+(.+)", s)
    if m and choices:
        text = _normalise_text(m.group(2).strip("*_ "))
        choice = _normalise_text(choices[_LETTERS.index(m.group(1))])
        if text and text == choice:
            return m.group(1)
    return None


# "the correct option is (C)", "the best choice would be B", "I choose B"
_CHOICE_CUE = re.compile(r"(?i:\b(?:correct|best|right|final|most\s+likely)\s+(?:choice|option|answer)\s+"
                         r"(?:is|would\s+be|"
                         r"must\s+be|should\s+be)\b:?"
                         # "I choose B", "I'd go with (B)", "I would pick C"
                         r"|\bI(?:[’']d|[’']ll|\s+would|\s+will)?\s+(?:choose|pick|select|go\s+with)\b:?"
                         r"|\b(?:thus|so|therefore|hence)\b,?(?=\s*\**[\(\[]?[A-D][\)\]]?\**\s*[.!]?\s*$)"
                         # "Wait, no. Looking again, B.": a lone letter after a comma/colon ends the line
                         r"|(?<=[a-z])[,:](?=\s*\**[\(\[]?[A-D][\)\]]?\**\s*[.!]?\s*$))", re.MULTILINE)
# "(B) is the correct answer", "Option C is correct"
_IS_CORRECT = re.compile(r"(?:^|(?<=\s))(?i:option\s+|choice\s+)?[\(\[]?([A-D])[\)\]]?\*{0,2}\s+is\s+(?:the\s+)?"
                         r"(?i:correct|right|best)(?:\s+(?i:answer|choice|option))?\**\s*[.!]?\**\s*$", re.MULTILINE)


# an option letter in the text after a retraction ("Hmm wait, actually it's C.", "corresponds to option B");
# "A" followed by a lowercase word is the article
_TAIL_LETTER = re.compile(r"[\(\[]([A-D])[\)\]]|\b(?i:option|choice)\s+([A-D])\b|(?<![A-Za-z'’\\])([A-D])"
                          r"(?![A-Za-z'’\-])(?!\s+(?!(?:or|and|nor|vs|versus|then)\b)[a-z])")
# "(B) is incorrect", "B is wrong", "not B": the letter is ruled out on its own line
_RULED_OUT = re.compile(r"(?i)\A[\s*_)\]]*(?:is|was|seems|looks)\s+"
                        r"(?:not\b|incorrect|wrong|false|ruled|eliminated|out\b)"
                        r"|\A[\s*_)\]]*(?:isn[’']?t|can[’']?t|cannot)\b")


def _tail_choice(after: str) -> str | None:
    """The one option letter named after the first retraction word of ``after``; None if none or several."""
    masked = _mask_math(after)
    m = _RETRACT.search(masked) or re.match(r"[\s*_)\]}.]*\?", masked)
    rest = masked[m.end():] if m else masked
    letters = {next(g for g in t.groups() if g) for t in _TAIL_LETTER.finditer(rest)}
    cuts = [c.end() for c in re.finditer(r"[.!?;](?=\s)|\n", rest.rstrip())]
    final = rest[cuts[-1]:] if cuts else rest
    if _HEDGE.search(final) or "?" in final:
        return None  # the retraction ends in a question or a hedge: no letter is committed
    if len(letters) > 1:
        # several letters after the retraction: the one the final sentence names ("... the heaviest, which is (D).")
        letters = {next(g for g in t.groups() if g) for t in _TAIL_LETTER.finditer(final)}
    return letters.pop() if len(letters) == 1 else None


def final_choice(region: str, choices: list[str] | None = None) -> str | None:
    """The final option letter of a region, :data:`AMBIGUOUS`, or None (see the module docstring).

    The last candidate (box, answer statement, choice cue, "(B) is correct", option-only line) is read unless the
    text after it takes it back (:func:`_retracted`); then the one letter named after the retraction, or None."""
    region = normalise_unicode(region)
    whole = re.fullmatch(r"\s*\**\s*[\(\[]?([a-dA-D])[\)\]]?\.?\s*\**\s*", region)
    if whole:  # the whole reply is one letter, in either case ("c", "(C)")
        return whole.group(1).upper()
    candidates: list[tuple[int, int, str]] = []  # (start, end of the letter's line or box, letter)
    region = blank_negations(region)
    group = final_box_group(region)
    if group:
        letters = {_choice_letter(c, choices) for c in group[2]}
        if len(letters) == 1:
            letter = letters.pop()
            if letter is not None:
                candidates.append((group[0], group[1], letter))
        elif letters - {None}:
            candidates.append((group[0], group[1], AMBIGUOUS))
    for start, end, body in cue_statements(region):
        lead = re.match(r"[\s*_:]*(?:(?i:option|choice)\s+)?[\(\[]?([A-D])(?:[\)\]]|\b)", body)
        if lead and _RULED_OUT.match(body[lead.end():]):
            # "Answer: (B) is ruled out, leaving (C)": the letter that is left, or nothing
            candidates.append((start, end, _tail_choice("no, " + body[lead.end():]) or AMBIGUOUS))
            continue
        boxes = final_box_group(body)
        letter = _choice_letter(boxes[2][-1] if boxes else body, choices)
        if letter is not None:
            candidates.append((start, end, letter))
    for m in _CHOICE_CUE.finditer(region):
        if _conditional(region, m.start()):
            continue
        eol = region.find("\n", m.end())
        eol = len(region) if eol < 0 else eol
        letter = _choice_letter(region[m.end():eol], choices)
        if letter is not None:
            candidates.append((m.start(), eol, letter))
    for m in _IS_CORRECT.finditer(region):
        candidates.append((m.start(), m.end(), m.group(1)))
    pos = 0
    bare: list[tuple[int, int, str, bool]] = []
    for line in region.split("\n"):
        letter = _bare_letter_line(line, choices)
        if letter is not None:
            bare.append((pos, pos + len(line), letter, bool(re.search(r"[A-D][\)\]\.:]\s+\S", line))))
        pos += len(line) + 1
    # "A) Helium" / "B) Neon" lines that restate the option list are no answer; one such line alone is
    listed = {letter for _, _, letter, with_text in bare if with_text}
    candidates += [(p, e, letter) for p, e, letter, with_text in bare if not (with_text and len(listed) > 1)]
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0])
    start, end, letter = candidates[-1]
    if letter == AMBIGUOUS:
        return letter
    # the letter's own statement may rule it out: "Answer: (B) is incorrect; the correct one is (D)."
    line = region[start:end]
    for m in re.finditer(r"[\(\[]?" + letter + r"\b[\)\]]?", line):
        if _RULED_OUT.match(line[m.end():]):
            return _tail_choice("no, " + line[m.end():] + region[end:])
    # "D) Krypton is wrong because ...": another option ruled out takes nothing back
    after = re.sub(r"(?<![A-Za-z])[\(\[]?(?!" + letter + r")[A-D][\)\]]?(?![A-Za-z'’])[^.\n]{0,80}?\b(?:is|are|was)"
                   r"\s+(?:wrong|incorrect|not\s+(?:right|correct)|ruled\s+out|eliminated)\b",
                   lambda m: " " * len(m.group(0)), region[end:])
    if _retracted(after) or re.search(r"\b" + letter + r"\b[\s*_)\]}.$]*\?", line):
        return _tail_choice(after)
    return letter


def extract_choice(text: str, choices: list[str] | None = None) -> str | None:
    """GPQA extraction: answer region (rules 1-2), then the final option letter; None if none or ambiguous."""
    letter = final_choice(split_reply(text or "").region, choices)
    return None if letter == AMBIGUOUS else letter


def last_answer_line(text: str) -> str | None:
    """Value text of the last answer statement that has one (kept for callers of the old API)."""
    for _start, _end, body in reversed(cue_statements(text)):
        value = statement_value_text(body)
        if value:
            return value
    return None
