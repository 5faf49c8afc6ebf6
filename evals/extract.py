"""Answer extraction following the s1 evaluation protocol.

The s1 models answer in the format ``<|im_start|>think ... <|im_start|>answer ...``. Extraction works in
three steps:

1. ``answer_region``: the text after the last ``<|im_start|>answer`` delimiter; if there is none, the text after
   the last ``<|im_start|>`` with that segment's first line (its role header) removed; else the whole output.
2. ``extract_answer``: inside that region, the content of the last ``\\boxed{...}`` (braces balanced, so nested
   LaTeX such as ``\\boxed{\\frac{1}{2}}`` is kept whole); else whatever follows the last ``Answer:``.
3. Task-specific normalisation happens in :mod:`evals.scoring` (integers for AIME, math-verify for MATH500, a
   letter A-D for GPQA).

Only the standard library is used here so this module imports instantly.
"""

from __future__ import annotations

import re

ANSWER_DELIMITER = "<|im_start|>answer"
SEGMENT_DELIMITER = "<|im_start|>"

# \boxed{...}, \boxed {...}, \fbox{...}; also the brace-less form "\boxed 5".
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)


def answer_region(text: str) -> str:
    """The part of a model output that holds the final answer (step 1 of the s1 extraction)."""
    if text is None:
        return ""
    idx = text.rfind(ANSWER_DELIMITER)
    if idx >= 0:
        return text[idx + len(ANSWER_DELIMITER):]
    idx = text.rfind(SEGMENT_DELIMITER)
    if idx >= 0:
        rest = text[idx + len(SEGMENT_DELIMITER):]
        newline = rest.find("\n")
        return rest[newline + 1:] if newline >= 0 else ""
    return text


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


def boxed_contents(text: str) -> list[str]:
    """All complete ``\\boxed{...}`` / ``\\fbox{...}`` contents in order of appearance.

    Unclosed boxes (an output cut off by the token limit) are skipped.
    """
    found: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        start = 0
        while True:
            idx = text.find(command, start)
            if idx < 0:
                break
            j = idx + len(command)
            start = j
            # \boxedfoo is another command; only accept a brace, whitespace or a digit/letter after a space.
            k = j
            while k < len(text) and text[k] in " \t":
                k += 1
            if k < len(text) and text[k] == "{":
                end = _match_braces(text, k)
                if end is not None:
                    found.append((idx, text[k + 1:end]))
                    start = end + 1
            elif k > j and k < len(text):
                # "\boxed 5" form: the token up to whitespace or "$".
                m = re.match(r"[^\s$]+", text[k:])
                if m:
                    found.append((idx, m.group(0)))
    found.sort(key=lambda t: t[0])
    return [content.strip() for _, content in found]


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}`` in ``text``, or None."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def _clean_answer_line(line: str) -> str:
    line = line.strip()
    # Markdown emphasis, a final full stop and surrounding math delimiters.
    line = line.strip("*_ ").strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    if line.startswith("$$") and line.endswith("$$") and len(line) >= 4:
        line = line[2:-2]
    elif line.startswith("$") and line.endswith("$") and len(line) >= 2:
        line = line[1:-1]
    elif line.startswith("\\(") and line.endswith("\\)"):
        line = line[2:-2]
    elif line.startswith("\\[") and line.endswith("\\]"):
        line = line[2:-2]
    line = line.strip()
    if line.endswith("."):
        line = line[:-1]
    return line.strip().strip("*_ ").strip()


def last_answer_line(text: str) -> str | None:
    """What follows the last ``Answer:`` marker, up to the end of that line (empty results are skipped)."""
    matches = list(_ANSWER_MARKER.finditer(text))
    for m in reversed(matches):
        rest = text[m.end():]
        # "Answer:" may be followed by a newline and then the answer.
        rest = rest.lstrip(" \t*_")
        if rest.startswith("\n"):
            rest = rest.lstrip("\n")
        line = rest.split("\n", 1)[0]
        cleaned = _clean_answer_line(line)
        if cleaned:
            return cleaned
    return None


def extract_answer(text: str) -> str | None:
    """s1 extraction: answer region, then last ``\\boxed{}``, else last ``Answer:``; None if nothing is found."""
    region = answer_region(text or "")
    boxed = last_boxed(region)
    if boxed is not None and boxed != "":
        return boxed
    return last_answer_line(region)


# --------------------------------------------------------------------------------------------------- GPQA letters

_LETTERS = "ABCD"
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _strip_latex_wrappers(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    return s


def parse_choice_letter(answer: str | None, choices: list[str] | None = None) -> str | None:
    """Map an extracted GPQA answer to one of ``A``-``D``; None if it cannot be read.

    Accepts ``C``, ``(C)``, ``C)``, ``C.``, ``\\text{C}``, ``**C**``, ``Option C``, ``C) <choice text>``, and,
    when ``choices`` is given, the exact text of one choice. A lowercase single letter is accepted only on its
    own (so that words such as "a" in a sentence never count).
    """
    if answer is None:
        return None
    s = _strip_latex_wrappers(answer).strip()
    s = s.strip("*_$ ").strip()
    if not s:
        return None
    # Exactly a letter, optionally bracketed / followed by punctuation.
    m = re.fullmatch(r"[\(\[]?\s*([A-Da-d])\s*[\)\]]?[.:]?", s)
    if m:
        return m.group(1).upper()
    # "(C) text", "C) text", "C. text", "C: text" (uppercase only).
    m = re.match(r"[\(\[]?([A-D])[\)\]\.:](?:\s|$)", s)
    if m:
        return m.group(1)
    # "Option C", "Choice (C)", "The answer is C": the keyword in any case, the letter uppercase only (so that
    # "the answer is a noble gas" is not read as A).
    m = re.search(r"\b(?i:option|choice|answer is|answer)\s*[\(\[]?([A-D])\b[\)\]]?", s)
    if m:
        return m.group(1)
    if choices:
        norm = _normalise_text(s)
        hits = [i for i, c in enumerate(choices) if _normalise_text(c) == norm]
        if len(hits) == 1:
            return _LETTERS[hits[0]]
    return None


def _normalise_text(s: str) -> str:
    s = _strip_latex_wrappers(s)
    s = s.replace("$", "")
    return re.sub(r"\s+", " ", s).strip().rstrip(".").lower()


def extract_choice(text: str, choices: list[str] | None = None) -> str | None:
    """GPQA extraction: s1 answer region, then last ``\\boxed{}`` / ``Answer:``, then a letter A-D (or None)."""
    region = answer_region(text or "")
    for candidate in (last_boxed(region), last_answer_line(region)):
        letter = parse_choice_letter(candidate, choices)
        if letter is not None:
            return letter
    return None
