"""torchtune dataset builders for iw-SFT: s1K-1.1 in the s1 chat format, and any OpenAI-style chat dataset.

Both builders return an :class:`IwsftSFTDataset`, a map-style dataset whose samples are::

    {"tokens": List[int] (L,), "labels": List[int] (L,), "sample_id": int, "quality": float}

- ``labels[t] = tokens[t]`` where the loss applies, else ``CROSS_ENTROPY_IGNORE_IDX`` (-100); not shifted (the
  recipe shifts). Loss applies to assistant turns only: their content and closing ``<|im_end|>``; the role header
  ``<|im_start|>assistant\\n`` is prompt (as in s1's completion-only collator) unless ``train_on_header=True``.
- ``sample_id`` is the row's index in the *unfiltered* source, so it is stable under ``filter_grade`` and across
  runs and ranks (the key of the reference log-prob cache).
- ``quality`` is the value of ``quality_column`` (finite float), 1.0 without one.

Every row is validated and tokenized once, at construction. Rows longer than ``max_seq_len`` tokens are dropped
and counted (``dropped N of M rows longer than max_seq_len=...`` in the log) unless ``truncate=True``.
Tokenization runs with the tokenizer's own ``max_seq_len`` disabled: torchtune 0.6.1's Qwen tokenizer, when it
has a ``max_seq_len``, forces the last mask entry to "masked" even when nothing was cut (upstream #2792), so the
final ``<|im_end|>`` would never be trained; length handling happens here instead.

Configs::

    dataset:
      _component_: iwsft.tune.datasets.s1k_dataset
      source: simplescaling/s1K-1.1        # or a local .json/.jsonl/.parquet file
      filter_grade: null                   # "Yes" keeps only rows the grader accepted
      max_seq_len: 20000
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message, validate_messages

log = logging.getLogger(__name__)

QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_ROLES = ("system", "user", "assistant")

__all__ = [
    "IwsftSFTDataset", "QWEN_DEFAULT_SYSTEM_PROMPT", "chat_dataset", "load_rows", "s1_assistant_text",
    "s1_messages", "s1k_dataset", "CuratedSFTDataset", "curated_dataset",
]


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_rows(source: str, data_files=None, split: str = "train", **load_dataset_kwargs):
    """Loads a ``datasets.Dataset`` from the HF hub, a local file, a local directory or a builder + ``data_files``.

    ``source`` may be: a hub name (``simplescaling/s1K-1.1``); a path to a ``.json``/``.jsonl``/``.parquet``/
    ``.csv`` file; a directory ``load_dataset`` understands; or a builder name (``json``, ``parquet``, ...) with
    ``data_files``. With ``data_files`` and a non-builder ``source``, the builder is taken from the files' suffix.
    """
    from datasets import load_dataset

    def builder_for(files) -> Optional[str]:
        first = files if isinstance(files, (str, os.PathLike)) else (
            next(iter(files.values())) if isinstance(files, Mapping) else files[0])
        if isinstance(first, (list, tuple)):
            first = first[0]
        return _FILE_BUILDERS.get(Path(str(first)).suffix.lower())

    if data_files is not None:
        builder = source if source in set(_FILE_BUILDERS.values()) else builder_for(data_files)
        if builder is None:
            raise ValueError(f"cannot tell the file format of data_files={data_files!r}; pass source='json' etc.")
        _check_local_files(data_files)
        no_rows = ValueError(f"dataset.data_files={data_files!r} holds no rows (split {split!r}): give a file with "
                             "at least one row.")
        try:
            rows = load_dataset(builder, data_files=data_files, split=split, **load_dataset_kwargs)
        except StopIteration:  # datasets' json builder on a file with no rows: a bare StopIteration
            raise no_rows from None
        except ValueError as exc:  # ... or, e.g. for `[]`: 'Instruction "train" corresponds to no data!'
            if "corresponds to no data" in str(exc):
                raise no_rows from None
            raise
        if len(rows) == 0:
            raise no_rows
        return rows
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"unsupported data file {path} (use .json, .jsonl, .parquet or .csv)")
        _check_local_files(str(path), key="dataset.source")
        return load_dataset(builder, data_files=str(path), split=split, **load_dataset_kwargs)
    return load_dataset(str(path) if path.is_dir() else source, split=split, **load_dataset_kwargs)


def _local_paths(data_files) -> List[str]:
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    if isinstance(data_files, Mapping):
        return [p for v in data_files.values() for p in _local_paths(v)]
    return [p for v in data_files for p in _local_paths(v)]


def _check_local_files(data_files, key: str = "dataset.data_files") -> None:
    """A local data file that is empty (or only whitespace) makes ``datasets``' json builder raise a bare
    ``StopIteration`` naming nothing; refuse it here naming the file and ``dataset.data_files``. Hub paths, globs
    and remote URLs are left to ``datasets``."""
    for p in _local_paths(data_files):
        path = Path(os.path.expanduser(p))
        if not path.is_file():
            continue
        with open(path, "rb") as f:  # stops at the first non-blank byte: cheap on any file size
            while True:
                block = f.read(1 << 16)
                if not block:
                    raise ValueError(f"{key}: {path} is empty (no rows): point {key} at a file with at least "
                                     "one row (was it truncated or not yet written?).")
                if block.strip():
                    break


# ----------------------------------------------------------------------------------------------------------------
# the dataset


def _logger() -> logging.Logger:
    # The recipe configures only torchtune's own logger; give ours a stderr handler (like torchtune's get_logger)
    # unless the application already configured logging, so the drop count is always visible.
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    return log


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_max_seq_len(max_seq_len: Optional[int]) -> Optional[int]:
    if max_seq_len is None:
        return None
    if isinstance(max_seq_len, bool) or int(max_seq_len) != max_seq_len or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an integer >= 2 or None, got {max_seq_len!r}")
    return int(max_seq_len)


class IwsftSFTDataset(Dataset):
    """Pre-tokenized SFT samples that carry ``sample_id`` and ``quality`` (see the module docstring).

    Args:
        rows: a sequence of dict rows (e.g. a ``datasets.Dataset``), indexed ``0..M-1``; that index is the sample id.
        to_messages: ``(row, index) -> List[Message]``; raises ``ValueError`` naming the index and column on bad rows.
        tokenizer: a torchtune ``ModelTokenizer`` (``tokenize_messages(messages) -> (tokens, mask)``).
        keep: optional ``(row, index) -> bool``; rows it rejects are skipped (their ids are simply absent).
        quality_column: optional column with a finite numeric score per row.
        max_seq_len: drop (or, with ``truncate``, cut) samples longer than this; default: the tokenizer's.
        truncate: cut long samples to ``max_seq_len`` tokens instead of dropping them (no EOS is forced at the cut).
        train_on_header: also train on ``<|im_start|>assistant\\n`` (torchtune's default behaviour).
        skip_invalid: skip malformed rows (counted and logged with the first error) instead of raising.
        description: a short string for the log and the fingerprint (e.g. the source).

    Attributes:
        sample_ids (np.ndarray [N] int64), num_source_rows (M), num_filtered (rows rejected by ``keep``),
        num_dropped (rows over ``max_seq_len``), num_truncated, num_invalid (rows skipped by ``skip_invalid``),
        num_no_labels (rows left with no label token, e.g. a prompt longer than ``max_seq_len`` with
        ``truncate``: dropped, never trained as a loss of 0), max_seq_len.

    Raises ``ValueError`` naming the cause and the key to change when no trainable row is left.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        to_messages: Callable[[Mapping[str, Any], int], List[Message]],
        tokenizer,
        *,
        keep: Optional[Callable[[Mapping[str, Any], int], bool]] = None,
        quality_column: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        truncate: bool = False,
        train_on_header: bool = False,
        skip_invalid: bool = False,
        description: str = "dataset",
    ) -> None:
        if max_seq_len is None:
            max_seq_len = getattr(tokenizer, "max_seq_len", None)
        self.max_seq_len = _check_max_seq_len(max_seq_len)
        self.truncate = bool(truncate)
        self.description = description
        # A shallow copy with the length limit switched off (see the module docstring: torchtune #2792). It shares
        # the vocabulary and BPE cache with the caller's tokenizer.
        tok = copy.copy(tokenizer)
        if hasattr(tok, "max_seq_len"):
            tok.max_seq_len = None
        header = self._assistant_header(tok) if not train_on_header else None

        self._tokens: List[np.ndarray] = []
        self._labels: List[np.ndarray] = []
        ids: List[int] = []
        quality: List[float] = []
        self.num_source_rows = len(rows)
        self.num_filtered = self.num_dropped = self.num_truncated = self.num_invalid = self.num_no_labels = 0
        first_error = None
        for i in range(self.num_source_rows):
            row = rows[i]
            try:
                if not isinstance(row, Mapping):
                    raise ValueError(f"row {i}: expected a mapping of columns, got {type(row).__name__}")
                if keep is not None and not keep(row, i):
                    self.num_filtered += 1
                    continue
                q = self._quality(row, i, quality_column)
                messages = to_messages(row, i)
                try:
                    validate_messages(messages)
                except ValueError as e:
                    raise ValueError(f"row {i}: invalid conversation: {e}") from None
            except ValueError as e:
                if not skip_invalid:
                    raise
                self.num_invalid += 1
                first_error = first_error or str(e)
                continue
            tokens, mask = tok.tokenize_messages(messages)
            tokens = np.asarray(tokens, dtype=np.int64)
            mask = np.asarray(mask, dtype=bool)
            if header is not None:
                mask = self._mask_headers(tokens, mask, header)
            if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
                if not self.truncate:
                    self.num_dropped += 1
                    continue
                tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
                self.num_truncated += 1
            if mask[1:].all():  # no label token left (the first position is never a target after the shift):
                self.num_no_labels += 1  # the row would train on nothing and log a loss of 0; drop and count it
                continue
            labels = np.where(mask, CROSS_ENTROPY_IGNORE_IDX, tokens)
            self._tokens.append(tokens)
            self._labels.append(labels)
            ids.append(i)
            quality.append(q)
        self.sample_ids = np.asarray(ids, dtype=np.int64)
        self.quality = np.asarray(quality, dtype=np.float64)

        if _is_rank_zero():
            kept = len(self.sample_ids)
            considered = self.num_source_rows - self.num_filtered - self.num_invalid
            msg = (f"{description}: {kept} samples from {self.num_source_rows} rows "
                   f"({self.num_filtered} filtered out); dropped {self.num_dropped} of "
                   f"{considered} rows longer than max_seq_len={self.max_seq_len}")
            if self.num_truncated:
                msg += f"; truncated {self.num_truncated} rows to max_seq_len={self.max_seq_len}"
            if self.num_no_labels:
                msg += (f"; dropped {self.num_no_labels} rows left with no label tokens"
                        + (" after truncation" if self.truncate else ""))
            if self.num_invalid:
                msg += f"; skipped {self.num_invalid} invalid rows (first: {first_error})"
            lg = _logger()
            (lg.warning if self.num_dropped or self.num_truncated or self.num_invalid or self.num_no_labels
             else lg.info)(msg)
        if len(self.sample_ids) == 0:
            raise ValueError(f"{description}: no samples left to train on: {self._empty_cause()}")

    def drop_counts(self) -> Dict[str, int]:
        """Rows not trained on, per cause (for the run summary)."""
        return {"source_rows": self.num_source_rows, "kept": len(self.sample_ids), "filtered": self.num_filtered,
                "too_long": self.num_dropped, "no_label_tokens": self.num_no_labels,
                "truncated": self.num_truncated, "invalid": self.num_invalid}

    def _empty_cause(self) -> str:
        """Why nothing is left, and which key changes it (the largest cause first)."""
        causes = []
        if self.num_no_labels:
            causes.append(f"{self.num_no_labels} rows have no label tokens"
                          + (f" after truncation to max_seq_len={self.max_seq_len} (the prompt alone is longer): "
                             "raise dataset.max_seq_len" if self.truncate else
                             ": every assistant turn is masked (check train_on_input/the conversation column)"))
        if self.num_dropped:
            causes.append(f"{self.num_dropped} rows are longer than max_seq_len={self.max_seq_len}: raise "
                          "dataset.max_seq_len (or tokenizer.max_seq_len)")
        if self.num_filtered:
            causes.append(f"{self.num_filtered} rows were filtered out: check dataset.filter_grade")
        if self.num_invalid:
            causes.append(f"{self.num_invalid} rows are invalid (skip_invalid): fix the data")
        return "; ".join(causes) or f"the source has {self.num_source_rows} rows"

    @staticmethod
    def _assistant_header(tok) -> Optional[np.ndarray]:
        # ChatML tokenizers (Qwen) open every turn with <|im_start|>{role}\n; other tokenizers keep torchtune's
        # behaviour (header trained) because their header layout is not known here.
        im_start = getattr(tok, "im_start_id", None)
        if im_start is None:
            return None
        return np.asarray([im_start] + list(tok.encode("assistant\n", add_bos=False, add_eos=False)),
                          dtype=np.int64)

    @staticmethod
    def _mask_headers(tokens: np.ndarray, mask: np.ndarray, header: np.ndarray) -> np.ndarray:
        """Masks the header at the start of every trained run (a trained run starts where mask goes True→False)."""
        mask = mask.copy()
        starts = np.flatnonzero(~mask & np.concatenate(([True], mask[:-1])))
        h = len(header)
        for s in starts:
            if s + h <= len(tokens) and np.array_equal(tokens[s: s + h], header):
                mask[s: s + h] = True
        return mask

    @staticmethod
    def _quality(row: Mapping[str, Any], i: int, column: Optional[str]) -> float:
        if column is None:
            return 1.0
        if column not in row:
            raise ValueError(f"row {i}: missing quality column {column!r}")
        v = row[column]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"row {i}: column {column!r} must be a finite number, got {v!r}")
        return float(v)

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {
            "tokens": self._tokens[index].tolist(),
            "labels": self._labels[index].tolist(),
            "sample_id": int(self.sample_ids[index]),
            "quality": float(self.quality[index]),
        }

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64: tokens per sample."""
        return np.asarray([len(t) for t in self._tokens], dtype=np.int64)

    def fingerprint(self) -> str:
        """Short sha256 of every sample's ids, tokens, labels and quality: a cache key for reference log-probs."""
        h = hashlib.sha256()
        for sid, t, lab, q in zip(self.sample_ids, self._tokens, self._labels, self.quality):
            h.update(np.int64(sid).tobytes())
            h.update(np.int64(len(t)).tobytes())
            h.update(t.tobytes())
            h.update(lab.tobytes())
            h.update(np.float64(q).tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# s1K-1.1


def s1_assistant_text(thinking: Union[str, Sequence[str]], attempt: str) -> str:
    """s1's assistant turn: ``"<|im_start|>think\\n" + thinking.strip() + "\\n<|im_start|>answer\\n" + answer``.

    ``answer = attempt`` if it already contains ``"Answer:"``, else ``"Answer: " + attempt``. A list-valued
    thinking trace (s1K v1.0 layout) is joined with newlines first, as s1's tokenization script does.
    """
    if not isinstance(thinking, str):
        thinking = "\n".join(thinking)
    answer = attempt if "Answer:" in attempt else "Answer: " + attempt
    return "<|im_start|>think\n" + thinking.strip() + "\n<|im_start|>answer\n" + answer


def s1_messages(question: str, thinking, attempt: str, system_prompt: Optional[str] = QWEN_DEFAULT_SYSTEM_PROMPT,
                train_on_input: bool = False) -> List[Message]:
    """``[system, user(question), assistant(s1_assistant_text)]``; the system turn is omitted if ``system_prompt``
    is None. Qwen's chat template adds this default system prompt, so s1's training text contains it."""
    msgs = []
    if system_prompt is not None:
        msgs.append(Message(role="system", content=system_prompt, masked=not train_on_input))
    msgs.append(Message(role="user", content=question, masked=not train_on_input))
    msgs.append(Message(role="assistant", content=s1_assistant_text(thinking, attempt), masked=False))
    return msgs


def _text(row: Mapping[str, Any], i: int, column: str, allow_list: bool = False):
    if column not in row:
        raise ValueError(f"row {i}: missing column {column!r}")
    v = row[column]
    if allow_list and isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        if not "".join(v).strip():
            raise ValueError(f"row {i}: column {column!r} is empty")
        return list(v)
    if not isinstance(v, str):
        raise ValueError(f"row {i}: column {column!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise ValueError(f"row {i}: column {column!r} is empty")
    return v


def s1k_dataset(
    tokenizer,
    source: str = "simplescaling/s1K-1.1",
    data_files=None,
    split: str = "train",
    trace: str = "deepseek",
    filter_grade: Union[None, str, Sequence[str]] = None,
    quality_column: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    truncate: bool = False,
    system_prompt: Optional[str] = QWEN_DEFAULT_SYSTEM_PROMPT,
    train_on_input: bool = False,
    train_on_header: bool = False,
    skip_invalid: bool = False,
    packed: bool = False,
    **load_dataset_kwargs,
) -> IwsftSFTDataset:
    """s1K-1.1 (or a local file with its columns) in the s1 chat format, with ``sample_id`` and ``quality``.

    Args:
        tokenizer: torchtune model tokenizer (the recipe passes it positionally).
        source: HF hub name, a local ``.json``/``.jsonl``/``.parquet`` file, or a builder name with ``data_files``.
        trace: ``"deepseek"`` or ``"gemini"``: which ``{trace}_thinking_trajectory``/``{trace}_attempt``/
            ``{trace}_grade`` columns to use.
        filter_grade: keep only rows whose ``{trace}_grade`` equals this (or is in this list), e.g. ``"Yes"``.
        quality_column: optional numeric column carried as ``quality`` (else 1.0).
        max_seq_len: rows with more tokens are dropped (counted in the log); default: the tokenizer's max_seq_len.
        truncate: cut instead of drop.
        system_prompt: system turn (Qwen's default, as in s1); None for no system turn.
        train_on_input: also train on the system and user turns.
        train_on_header: also train on ``<|im_start|>assistant\\n``.
        skip_invalid: skip malformed rows (missing/empty/mistyped columns), with a count in the log, instead of
            raising ``ValueError`` (which names the row index and the column).
        packed: packing is not supported (torchtune's PackedDataset drops ``sample_id``); must be False.
    """
    if packed:
        raise ValueError("packed=True is not supported: torchtune's PackedDataset drops sample_id and quality")
    if trace not in ("deepseek", "gemini"):
        raise ValueError(f"trace must be 'deepseek' or 'gemini', got {trace!r}")
    grades = None if filter_grade is None else (
        {filter_grade} if isinstance(filter_grade, str) else set(filter_grade))
    think_col, attempt_col, grade_col = (f"{trace}_thinking_trajectory", f"{trace}_attempt", f"{trace}_grade")
    rows = load_rows(source, data_files=data_files, split=split, **load_dataset_kwargs)

    def keep(row, i):
        if grades is None:
            return True
        if grade_col not in row:
            raise ValueError(f"row {i}: missing column {grade_col!r} (needed by filter_grade)")
        return row[grade_col] in grades

    def to_messages(row, i):
        return s1_messages(_text(row, i, "question"), _text(row, i, think_col, allow_list=True),
                           _text(row, i, attempt_col), system_prompt=system_prompt, train_on_input=train_on_input)

    return IwsftSFTDataset(
        rows, to_messages, tokenizer, keep=keep, quality_column=quality_column, max_seq_len=max_seq_len,
        truncate=truncate, train_on_header=train_on_header, skip_invalid=skip_invalid,
        description=f"s1k_dataset({source if data_files is None else data_files}, trace={trace}, "
                    f"filter_grade={filter_grade})",
    )


# ----------------------------------------------------------------------------------------------------------------
# generic chat


def chat_dataset(
    tokenizer,
    source: str,
    data_files=None,
    split: str = "train",
    conversation_column: str = "messages",
    quality_column: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    truncate: bool = False,
    system_prompt: Optional[str] = None,
    train_on_input: bool = False,
    train_on_header: bool = False,
    skip_invalid: bool = False,
    packed: bool = False,
    **load_dataset_kwargs,
) -> IwsftSFTDataset:
    """Any chat dataset whose ``conversation_column`` holds OpenAI-style messages
    (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``); loss on every assistant turn.

    ``system_prompt``: inserted when a conversation has no system turn (pass Qwen's default to reproduce Qwen's
    chat template exactly; None adds nothing). Other arguments as in :func:`s1k_dataset`.
    """
    if packed:
        raise ValueError("packed=True is not supported: torchtune's PackedDataset drops sample_id and quality")
    rows = load_rows(source, data_files=data_files, split=split, **load_dataset_kwargs)

    def to_messages(row, i):
        if conversation_column not in row:
            raise ValueError(f"row {i}: missing column {conversation_column!r}")
        conv = row[conversation_column]
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"row {i}: column {conversation_column!r} must be a non-empty list of messages")
        msgs = []
        for j, m in enumerate(conv):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise ValueError(f"row {i}: column {conversation_column!r}, message {j}: expected "
                                 "{'role': str, 'content': str}")
            if m["role"] not in _ROLES:
                raise ValueError(f"row {i}: column {conversation_column!r}, message {j}: unsupported role "
                                 f"{m['role']!r} (expected one of {_ROLES})")
            if not m["content"].strip():
                raise ValueError(f"row {i}: column {conversation_column!r}, message {j}: empty content")
            msgs.append(Message(role=m["role"], content=m["content"],
                                masked=(m["role"] != "assistant") and not train_on_input))
        if system_prompt is not None and msgs[0].role != "system":
            msgs.insert(0, Message(role="system", content=system_prompt, masked=not train_on_input))
        if msgs[-1].role != "assistant":
            raise ValueError(f"row {i}: column {conversation_column!r}: the last message must be the assistant's")
        return msgs

    return IwsftSFTDataset(
        rows, to_messages, tokenizer, quality_column=quality_column, max_seq_len=max_seq_len, truncate=truncate,
        train_on_header=train_on_header, skip_invalid=skip_invalid,
        description=f"chat_dataset({source if data_files is None else data_files})",
    )


# ----------------------------------------------------------------------------------------------------------------
# self-curated samples with their sampling log-probs (python -m iwsft.curate)


class CuratedSFTDataset(IwsftSFTDataset):
    """An :class:`IwsftSFTDataset` whose samples carry the exact ``log p_ref`` recorded at sampling time.

    Built by :func:`curated_dataset`. ``reference_log_probs()`` returns them as an ``iwsft.ReferenceLogProbs``
    (``sample_id → [label tokens]`` fp32), which the recipe uses with ``reference.strategy: dataset``.
    Attributes: ``num_mismatched`` (rows refused/skipped because the tokenization differs from the recorded ids).
    """

    ref_logprobs: Dict[int, np.ndarray]
    num_mismatched: int = 0

    def drop_counts(self) -> Dict[str, int]:
        """As the base class, plus ``mismatched`` (rows skipped by ``on_mismatch: skip``): then
        ``source_rows = kept + filtered + mismatched + too_long + no_label_tokens + invalid``."""
        return {**super().drop_counts(), "mismatched": self.num_mismatched}

    def reference_log_probs(self):
        import torch

        from iwsft.reference import ReferenceLogProbs

        cache = ReferenceLogProbs(key={"source": "dataset", "description": self.description})
        for sid in self.sample_ids.tolist():
            cache._data[int(sid)] = torch.from_numpy(self.ref_logprobs[int(sid)].astype(np.float32))
        return cache


def _first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def curated_dataset(
    tokenizer,
    source: str,
    data_files=None,
    split: str = "train",
    conversation_column: str = "messages",
    reward_column: str = "reward",
    min_reward: Optional[float] = 1.0,
    prompt_ids_column: str = "prompt_token_ids",
    response_ids_column: str = "response_token_ids",
    logprobs_column: str = "response_logprobs",
    on_mismatch: str = "error",
    quality_column: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    **load_dataset_kwargs,
) -> CuratedSFTDataset:
    """Curated samples written by ``python -m iwsft.curate`` (``OUT/samples.jsonl``), ready for
    ``reference.strategy: dataset``.

    Keeps rows with ``reward_column >= min_reward`` (``min_reward: null`` keeps all: then it is plain
    distillation of the samples, not curation). Each kept row's conversation is tokenized exactly as in
    :func:`chat_dataset` (loss on the assistant turn and its ``<|im_end|>``), then checked against the recorded ids:
    the tokens must equal ``prompt_token_ids + response_token_ids`` and the label positions must be exactly the
    response. A differing row (e.g. a sample whose ids do not survive decode → re-encode, or one cut at
    ``max_new_tokens`` whose trained ``<|im_end|>`` was never sampled) raises ``ValueError`` with its row index
    and first differing position (``on_mismatch: error``, the default), or is skipped and counted in the log
    (``on_mismatch: skip``). The recorded ``response_logprobs`` (one per response token) become the reference
    log-probs of the label tokens, in order.
    """
    if packed:
        raise ValueError("packed=True is not supported: torchtune's PackedDataset drops sample_id and quality")
    if on_mismatch not in ("error", "skip"):
        raise ValueError(f"on_mismatch={on_mismatch!r}: use 'error' or 'skip'")
    rows = load_rows(source, data_files=data_files, split=split, **load_dataset_kwargs)

    def keep(row, i):
        if min_reward is None:
            return True
        if reward_column not in row:
            raise ValueError(f"row {i}: missing column {reward_column!r} (needed by min_reward; set "
                             "dataset.reward_column or dataset.min_reward: null)")
        r = row[reward_column]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"row {i}: column {reward_column!r} must be a finite number, got {r!r}")
        return r >= min_reward

    def to_messages(row, i):
        conv = row.get(conversation_column) if isinstance(row, Mapping) else None
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"row {i}: column {conversation_column!r} must be a non-empty list of messages")
        msgs = []
        for j, m in enumerate(conv):
            if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"row {i}: column {conversation_column!r}, message {j}: expected "
                                 f"{{'role': one of {_ROLES}, 'content': str}}")
            msgs.append(Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant"))
        if msgs[-1].role != "assistant":
            raise ValueError(f"row {i}: column {conversation_column!r}: the last message must be the assistant's")
        return msgs

    ds = CuratedSFTDataset(
        rows, to_messages, tokenizer, keep=keep, quality_column=quality_column, max_seq_len=max_seq_len,
        description=f"curated_dataset({source if data_files is None else data_files}, min_reward={min_reward})",
    )
    keep_idx, ref, first = [], {}, None
    for n, sid in enumerate(ds.sample_ids.tolist()):
        row = rows[sid]
        for col in (prompt_ids_column, response_ids_column, logprobs_column):
            if col not in row:
                raise ValueError(f"row {sid}: missing column {col!r}; reference.strategy=dataset needs the ids and "
                                 "log-probs written by python -m iwsft.curate")
        prompt, resp, lp = list(row[prompt_ids_column]), list(row[response_ids_column]), row[logprobs_column]
        if len(lp) != len(resp):
            raise ValueError(f"row {sid}: {len(resp)} ids in {response_ids_column!r} but {len(lp)} log-probs in "
                             f"{logprobs_column!r}")
        lp = np.asarray(lp, dtype=np.float64)
        if not np.isfinite(lp).all() or (lp > 0).any():
            raise ValueError(f"row {sid}: {logprobs_column!r} holds values that are not finite log-probs (<= 0)")
        tokens, labels = ds._tokens[n], ds._labels[n]
        expect = prompt + resp
        pos = _first_difference(tokens.tolist(), expect)
        if pos is None:
            trained = np.flatnonzero(labels != CROSS_ENTROPY_IGNORE_IDX)
            if not np.array_equal(trained, np.arange(len(prompt), len(expect))):
                pos = int(trained[0]) if len(trained) else len(prompt)
        if pos is not None:
            what = (f"row {sid}: the recipe's tokenization differs from the recorded ids at position {pos} "
                    f"(response token {pos - len(prompt)}): recorded "
                    f"{expect[pos] if pos < len(expect) else 'end'}, tokenized "
                    f"{int(tokens[pos]) if pos < len(tokens) else 'end'}")
            if row.get("finish_reason") == "length":
                what += " (the sample was cut at max_new_tokens: its trained <|im_end|> was never sampled)"
            if on_mismatch == "error":
                raise ValueError(what + "; its log p_ref would not belong to the trained tokens. Use the tokenizer "
                                 "the samples came from, or dataset.on_mismatch=skip to drop such rows.")
            ds.num_mismatched += 1
            first = first or what
            continue
        keep_idx.append(n)
        ref[int(sid)] = lp
    if ds.num_mismatched:
        ds._tokens = [ds._tokens[n] for n in keep_idx]
        ds._labels = [ds._labels[n] for n in keep_idx]
        ds.sample_ids, ds.quality = ds.sample_ids[keep_idx], ds.quality[keep_idx]
        if _is_rank_zero():
            _logger().warning(f"{ds.description}: skipped {ds.num_mismatched} rows whose tokenization differs from "
                              f"the recorded ids (on_mismatch=skip; first: {first}); {len(keep_idx)} left")
        if not keep_idx:
            raise ValueError(f"{ds.description}: no samples left: every kept row differs from its recorded ids")
    ds.ref_logprobs = ref
    return ds
