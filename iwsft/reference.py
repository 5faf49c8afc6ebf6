"""Reference log-probabilities ``log p_ref(y_t)`` cached per sample.

``p_ref`` is the model the curated data came from; in practice the frozen starting model. Its log-probs never
change, so they can be computed once (one no-grad pass with the starting weights before the first optimiser step)
and looked up by sample id for the rest of training: no second model in memory.

The cache stores, for each integer sample id, the fp32 log-probs of that sample's label tokens in order (a ragged
collection, saved as one flat tensor plus offsets). A ``key`` dict records what it was computed from (dataset,
checkpoint, tokenizer settings) so a stale cache is detected rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

FORMAT_VERSION = 1


def fingerprint(*parts) -> str:
    """Short sha256 of JSON-serialisable ``parts`` (non-JSON values are turned into strings)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StaleCacheError(ValueError):
    """A readable reference cache computed for other data, model or settings (its key differs). A subclass of
    ValueError, so that it can be told apart from the ValueErrors a damaged file raises inside ``torch.load``
    (e.g. UnicodeDecodeError on garbage bytes)."""


class ReferenceLogProbs:
    """Ragged cache ``sample_id → log p_ref`` of the label tokens (fp32, CPU)."""

    def __init__(self, key: Optional[dict] = None):
        self.key = dict(key or {})
        self._data: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, sample_id) -> bool:
        return int(sample_id) in self._data

    def ids(self):
        return sorted(self._data)

    @torch.no_grad()
    def add(self, sample_ids: torch.Tensor, token_logp: torch.Tensor, mask: torch.Tensor) -> None:
        """Store row ``b``'s ``token_logp[b][mask[b]]`` under ``sample_ids[b]`` (``[B]``, ``[B, T]``, ``[B, T]``)."""
        mask = mask.bool()
        for b, sid in enumerate(sample_ids.tolist()):
            self._data[int(sid)] = token_logp[b][mask[b]].detach().float().cpu().clone()

    @torch.no_grad()
    def gather(self, sample_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` fp32 on ``mask.device``: each sample's cached values at its mask positions, 0 elsewhere."""
        mask = mask.bool()
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for b, sid in enumerate(sample_ids.tolist()):
            values = self._data.get(int(sid))
            if values is None:
                raise KeyError(f"sample_id {sid} is not in the reference cache ({len(self)} samples); the cache "
                               "was computed on other data: delete it or fix the dataset config.")
            n = int(mask[b].sum())
            if values.numel() != n:
                raise ValueError(f"sample_id {sid}: the cache holds {values.numel()} label tokens but the batch has "
                                 f"{n}; the tokenizer or max_seq_len changed since it was computed.")
            out[b, mask[b]] = values.to(out.device)
        return out

    def sequence_sums(self, sample_ids: torch.Tensor):
        """``(sums [B], counts [B])`` of the cached log-probs of each sample."""
        vals = [self._data[int(s)] for s in sample_ids.tolist()]
        return (torch.stack([v.sum() for v in vals]) if vals else torch.zeros(0),
                torch.tensor([v.numel() for v in vals], dtype=torch.long))

    def merge(self, others: Iterable["ReferenceLogProbs"]) -> "ReferenceLogProbs":
        """Add every entry of ``others`` (e.g. the shards computed by other ranks) to this cache; returns self."""
        for other in others:
            self._data.update(other._data)
        return self

    def state_dict(self) -> dict:
        ids = self.ids()
        lengths = torch.tensor([self._data[i].numel() for i in ids], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        values = torch.cat([self._data[i] for i in ids]) if ids else torch.zeros(0)
        return {"version": FORMAT_VERSION, "key": self.key, "ids": torch.tensor(ids, dtype=torch.long),
                "offsets": offsets, "values": values}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ReferenceLogProbs":
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"reference cache format {state.get('version')} is not {FORMAT_VERSION}; recompute it.")
        cache = cls(state["key"])
        offsets = state["offsets"].tolist()
        for j, sid in enumerate(state["ids"].tolist()):
            cache._data[sid] = state["values"][offsets[j]:offsets[j + 1]].clone()
        return cache

    def save(self, path) -> None:
        """Write atomically (temp file in the same folder, then rename): a crash never leaves half a cache."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path, key: Optional[dict] = None) -> "ReferenceLogProbs":
        """Load a saved cache; if ``key`` is given it must equal the stored key (else ``StaleCacheError``, a
        ValueError). A damaged file raises whatever ``torch.load`` raises."""
        cache = cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if key is not None and cache.key != dict(key):
            raise StaleCacheError(f"reference cache {path} was computed for {cache.key}, not {dict(key)}; "
                             "it is stale: delete it (or point reference.cache_path elsewhere) to recompute.")
        return cache
