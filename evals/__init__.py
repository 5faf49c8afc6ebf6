"""lm-eval task definitions and an evaluation runner for iw-SFT checkpoints (s1 protocol).

Task YAMLs live in this directory (load them with ``--include_path evals/``); see README.md, "Evaluation".
Short task keys map to lm-eval task names as ``<key>_iwsft`` (``aime24``, ``aime25``, ``math500``,
``gpqa_diamond``).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASK_KEYS = ("aime24", "aime25", "math500", "gpqa_diamond")
TASK_ALIASES = {"gpqa": "gpqa_diamond", "aime2024": "aime24", "aime2025": "aime25", "math": "math500"}


def task_name(key: str) -> str:
    """lm-eval task name for a short key (``aime24`` -> ``aime24_iwsft``); full names pass through."""
    key = key.strip()
    if key.endswith("_iwsft"):
        key = key[: -len("_iwsft")]
    key = TASK_ALIASES.get(key, key)
    if key not in TASK_KEYS:
        raise ValueError(f"unknown task {key!r}; choose from {', '.join(TASK_KEYS)} (alias: gpqa)")
    return f"{key}_iwsft"
