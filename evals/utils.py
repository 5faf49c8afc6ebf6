"""Hooks referenced by the task YAMLs in this directory (``!function utils.<name>``).

lm-eval imports this file by path, so it first makes sure the project's ``evals`` package is importable (the
lm-eval console script does not put the current directory on ``sys.path``). The logic lives in
``evals.data`` / ``evals.scoring`` / ``evals.metrics``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _ensure_project_importable() -> None:
    mod = sys.modules.get("evals")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve().parent != _ROOT / "evals":
        raise ImportError(
            f"another package called 'evals' ({getattr(mod, '__file__', mod)}) shadows {_ROOT / 'evals'}"
        )
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))


_ensure_project_importable()

from evals import data as _data  # noqa: E402
from evals.metrics import sample_metrics  # noqa: E402
from evals.scoring import score_aime, score_gpqa, score_math  # noqa: E402

# ------------------------------------------------------------------------------------------------- datasets
# lm-eval calls custom_dataset(**metadata, **dataset_kwargs); metadata carries --metadata / model_args keys.


def load_aime24(**kwargs):
    return _data.load_dataset_dict("aime24", kwargs)


def load_aime25(**kwargs):
    return _data.load_dataset_dict("aime25", kwargs)


def load_math500(**kwargs):
    return _data.load_dataset_dict("math500", kwargs)


def load_gpqa(**kwargs):
    return _data.load_dataset_dict("gpqa", kwargs)


# ------------------------------------------------------------------------------------------------- scoring


def keep_all(resps, docs):
    """Filter: keep every one of the ``repeats`` outputs per problem (lm-eval's default keeps the first only)."""
    return [list(r) for r in resps]


def _outputs(results) -> list:
    # with keep_all, lm-eval passes [[out_1, ..., out_k]]; a plain [out] (default filter) is accepted too. Outputs
    # are passed on as they are: evals.scoring.check_output rejects anything that is not text.
    if results and isinstance(results[0], (list, tuple)):
        return list(results[0])
    return list(results)


def _scored(kind: str, doc, results, score) -> dict[str, float]:
    """The metrics of one problem; an invalid gold answer or output is re-raised naming the problem's id."""
    try:
        verdicts = [score(r) for r in _outputs(results)]
        return sample_metrics(kind, verdicts, doc["answer"])
    except (ValueError, TypeError) as e:
        raise type(e)(f"{kind} problem id={doc.get('id', '?')!r}: {e}") from e


def process_aime(doc, results):
    return _scored("aime", doc, results, lambda r: score_aime(r, doc["answer"]))


def process_math(doc, results):
    return _scored("math", doc, results, lambda r: score_math(r, doc["answer"]))


def process_gpqa(doc, results):
    choices = list(doc.get("choices") or []) or None
    return _scored("gpqa", doc, results, lambda r: score_gpqa(r, doc["answer"], choices))


def total(items):
    """Aggregation: the sum (used for the no_answer / truncated / unparseable counts)."""
    return float(sum(items))
