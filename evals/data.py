"""Benchmark data: HF hub by default, or a local JSON / JSONL / CSV file.

Every benchmark is normalised to rows ``{"id", "problem", "answer"}`` (GPQA adds ``choices`` and keeps the gold
letter in ``answer``). Where the data comes from, first match wins:

1. task metadata ``<task>_data=FILE`` (e.g. ``--metadata aime24_data=/data/aime.jsonl`` on the lm-eval CLI);
2. task metadata ``data_dir=DIR`` holding the standard file name (table below);
3. environment variable ``IWSFT_<TASK>_DATA=FILE`` (e.g. ``IWSFT_AIME24_DATA``);
4. environment variable ``IWSFT_EVAL_DATA=DIR`` holding the standard file name;
5. the HF hub dataset the upstream lm-eval task uses (GPQA: gated; see :data:`GPQA_HELP`).

A data directory is used for a task only if the task's file is in it (so one ``data_dir`` can serve AIME and
MATH500 while GPQA still needs its own file). GPQA is never shipped with the project.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Source:
    key: str  # short task key: aime24, aime25, math500, gpqa
    filenames: tuple[str, ...]  # standard file names inside a data directory
    hf_path: str  # HF hub dataset the upstream lm-eval task uses (the default source)
    hf_name: str | None  # its config name (None: the default config)
    hf_split: str  # the split holding the problems


SOURCES: dict[str, Source] = {
    "aime24": Source("aime24", ("aime_2024.jsonl", "aime24.jsonl"), "Maxwell-Jia/AIME_2024", None, "train"),
    "aime25": Source("aime25", ("aime_2025.jsonl", "aime25.jsonl"), "math-ai/aime25", None, "test"),
    "math500": Source("math500", ("math500.jsonl", "math_500.jsonl"), "HuggingFaceH4/MATH-500", None, "test"),
    "gpqa": Source(
        "gpqa",
        ("gpqa_diamond.jsonl", "gpqa_diamond.json", "gpqa_diamond.csv"),
        "Idavidrein/gpqa",
        "gpqa_diamond",
        "train",
    ),
}

GPQA_HELP = """GPQA Diamond is not shipped with iwsft (its authors ask that the questions are not redistributed).
Provide it yourself, in one of these ways:
  * HF hub (gated): accept the terms at https://huggingface.co/datasets/Idavidrein/gpqa while logged in, then
    `huggingface-cli login` (or export HF_TOKEN=...) on the evaluation machine; the task then loads config
    `gpqa_diamond` by itself.
  * Local file: export the gated dataset (or the `gpqa_diamond.csv` inside the password-protected dataset.zip of
    github.com/idavidrein/gpqa; the password is in that repository's README) to CSV/JSON/JSONL with the columns
    `Question`, `Correct Answer`, `Incorrect Answer 1`, `Incorrect Answer 2`, `Incorrect Answer 3`
    (`Record ID` optional), and point the task at it with
        export IWSFT_GPQA_DATA=/path/to/gpqa_diamond.jsonl
    or `--metadata gpqa_data=/path/to/gpqa_diamond.jsonl` (lm-eval CLI) or `--gpqa-data PATH` (python -m evals.run).
Never commit the file."""


class DataUnavailableError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ locating a file


def resolve_local_path(key: str, metadata: dict[str, Any] | None = None, environ=None) -> Path | None:
    """The local file for task ``key`` according to the precedence in the module docstring, or None (use the hub)."""
    metadata = metadata or {}
    environ = os.environ if environ is None else environ
    src = SOURCES[key]
    candidates: list[tuple[str, str, bool]] = []  # (origin, value, is_dir)
    if metadata.get(f"{key}_data"):
        candidates.append((f"metadata {key}_data", str(metadata[f"{key}_data"]), False))
    if metadata.get("data_dir"):
        candidates.append(("metadata data_dir", str(metadata["data_dir"]), True))
    env_file = f"IWSFT_{key.upper()}_DATA"
    if environ.get(env_file):
        candidates.append((env_file, environ[env_file], False))
    if environ.get("IWSFT_EVAL_DATA"):
        candidates.append(("IWSFT_EVAL_DATA", environ["IWSFT_EVAL_DATA"], True))
    for origin, value, is_dir in candidates:
        path = Path(value).expanduser()
        if not is_dir:
            if not path.is_file():
                raise DataUnavailableError(f"{origin}={value}: no such file" + (
                    "\n\n" + GPQA_HELP if key == "gpqa" else ""))
            return path
        if not path.is_dir():
            raise DataUnavailableError(f"{origin}={value}: no such directory")
        for name in src.filenames:
            if (path / name).is_file():
                return path / name
    return None


# ------------------------------------------------------------------------------------------------ reading rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL, JSON (a list, or {"data"|"rows"|"train"|"test": [...]}) or CSV file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        obj = json.loads(text)
        if isinstance(obj, dict):
            for k in ("data", "rows", "test", "train"):
                if isinstance(obj.get(k), list):
                    return obj[k]
            raise ValueError(f"{path}: expected a JSON list of rows")
        return list(obj)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _first(row: dict[str, Any], names: tuple[str, ...], what: str, where: str):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    raise KeyError(f"{where}: row has no {what} column (tried {', '.join(names)}; has {sorted(row)})")


def normalise_math_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        problem = _first(row, ("problem", "Problem", "question", "Question"), "problem", where)
        answer = _first(row, ("answer", "Answer", "expected_answer"), "answer", where)
        ident = next((row[k] for k in ("id", "ID", "unique_id", "problem_id") if row.get(k) is not None), i)
        out.append({"id": str(ident), "problem": str(problem), "answer": str(answer).strip()})
    return out


def _clean_choice(text: Any) -> str:
    return " ".join(str(text).replace(" [title]", ". ").split())


def shuffle_seed(question: str) -> int:
    """Per-question seed: sha256 of the question text, so a question gets the same letters on every run, machine
    and data source (hub rows carry a ``Record ID``, many local exports do not)."""
    return int(hashlib.sha256(question.encode()).hexdigest()[:16], 16)


def normalise_gpqa_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """GPQA rows → problem with the four choices shuffled (seeded per question) into ``A) .. D)``."""
    out = []
    for i, row in enumerate(rows):
        question = str(_first(row, ("Question", "question"), "Question", where)).strip()
        correct = _clean_choice(_first(row, ("Correct Answer", "correct_answer"), "Correct Answer", where))
        wrong = [
            _clean_choice(_first(row, (f"Incorrect Answer {j}", f"incorrect_answer_{j}"), f"Incorrect Answer {j}",
                                 where))
            for j in (1, 2, 3)
        ]
        record_id = str(row.get("Record ID") or row.get("id") or "")
        choices = [correct] + wrong
        random.Random(shuffle_seed(question)).shuffle(choices)
        gold = "ABCD"[choices.index(correct)]
        body = "\n".join(f"{letter}) {text}" for letter, text in zip("ABCD", choices))
        out.append({
            "id": record_id or str(i),
            "problem": f"{question}\n\n{body}",
            "answer": gold,
            "choices": choices,
        })
    return out


def _hub_rows(src: Source) -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset(src.hf_path, src.hf_name, split=src.hf_split)
    return [dict(r) for r in ds]


def load_rows(key: str, metadata: dict[str, Any] | None = None, environ=None) -> list[dict[str, Any]]:
    """Normalised rows for task ``key`` (aime24, aime25, math500, gpqa)."""
    src = SOURCES[key]
    path = resolve_local_path(key, metadata, environ)
    if path is not None:
        raw, where = read_rows(path), str(path)
    else:
        try:
            raw, where = _hub_rows(src), f"hf://{src.hf_path}"
        except Exception as e:  # network, gated access, offline mode...
            if key == "gpqa":
                raise DataUnavailableError(
                    f"could not load GPQA Diamond from the HF hub ({type(e).__name__}: {e}).\n\n{GPQA_HELP}"
                ) from e
            raise DataUnavailableError(
                f"could not load {key} from the HF hub dataset {src.hf_path} ({type(e).__name__}: {e}). "
                f"Offline? Point the task at a local JSON/JSONL file with IWSFT_{key.upper()}_DATA=FILE, "
                f"IWSFT_EVAL_DATA=DIR (containing {src.filenames[0]}), or --metadata {key}_data=FILE."
            ) from e
    if not raw:
        raise DataUnavailableError(f"{where}: no rows")
    if key == "gpqa":
        return normalise_gpqa_rows(raw, where)
    return normalise_math_rows(raw, where)


def load_dataset_dict(key: str, metadata: dict[str, Any] | None = None):
    """The rows as a ``datasets.DatasetDict`` with one ``test`` split (what lm-eval's custom_dataset expects)."""
    import datasets

    rows = load_rows(key, metadata)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
