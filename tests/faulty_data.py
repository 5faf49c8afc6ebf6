"""A dataset component for the reliability tests: s1k_dataset with faults injected at chosen positions.

Used from a config override (``dataset._component_=faulty_data.faulty_s1k``, with this folder on PYTHONPATH), so
the recipe runs exactly as it would on real data:

- ``blank_positions``: those samples keep their tokens but have every label ignored (a micro-batch that trains on
  nothing, past the dataset's own no-label filter);
- ``poison_positions``: those samples report ``quality = inf`` (with ``quality.use=weight`` their loss weight, so
  the loss and the gradients become non-finite at that step only).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from iwsft.tune.datasets import s1k_dataset


class FaultyDataset(Dataset):
    def __init__(self, inner, blank_positions=(), poison_positions=()):
        self.inner = inner
        self.blank = {int(i) for i in blank_positions}
        self.poison = {int(i) for i in poison_positions}
        self.quality = inner.quality  # finite: the recipe's quality mean stays finite
        self.sample_ids = inner.sample_ids

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        sample = dict(self.inner[index])
        if index in self.blank:
            sample["labels"] = [-100] * len(sample["labels"])
        if index in self.poison:
            sample["quality"] = float("inf")
        return sample

    def fingerprint(self):
        return f"{self.inner.fingerprint()}-{sorted(self.blank)}-{sorted(self.poison)}"

    def drop_counts(self):
        return self.inner.drop_counts()


def faulty_s1k(tokenizer, blank_positions=(), poison_positions=(), **kwargs):
    return FaultyDataset(s1k_dataset(tokenizer, **kwargs), blank_positions, poison_positions)
