"""The training examples as the `datasets.Dataset` TRL's SFTTrainer reads, built from numpy arrays.

Each column is one Arrow list array: one flat array of every example's tokens and the offsets where
each example starts. A million conversations (~377M tokens) then cost two 2-byte token columns
(~1.5 GB), where Python lists of their ids and masks held ~27 GB (an ESTIMATE from list and int
sizes). The "labels" column (ids, -100 where the loss mask is 0) is made here, so TRL builds none
row by row in Python (docs/data-at-scale.md: what TRL does with it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.data.store import StoredExample
from common.data.tokenize import Example

IGNORE = -100  # the label of a token the loss skips (transformers' convention)


def token_ids(example) -> np.ndarray:
    """An example's ids as an array, without a Python list when it is a view into a token store."""
    if isinstance(example, StoredExample):
        return example.store.ids[example.start : example.start + example.length]
    return np.asarray(example.input_ids)


def loss_mask(example: Example) -> np.ndarray:
    if isinstance(example, StoredExample):
        return example.store.mask[example.start : example.start + example.length]
    return np.asarray(example.loss_mask)


def highest_id(examples: Sequence) -> int:
    return max((int(token_ids(e).max()) for e in examples if len(e)), default=-1)


@dataclass
class TokenColumns:
    """Example i is ids[offsets[i]:offsets[i + 1]] (labels alike)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, examples: Sequence[Example]) -> TokenColumns:
        offsets = np.zeros(len(examples) + 1, np.int64)
        np.cumsum([len(e) for e in examples], out=offsets[1:])
        # int16 holds every id of a 32768-token vocabulary and -100; larger vocabularies take int32
        dtype = np.int16 if highest_id(examples) < 1 << 15 else np.int32
        ids, labels = np.empty(offsets[-1], dtype), np.empty(offsets[-1], dtype)
        for example, start, end in zip(examples, offsets[:-1].tolist(), offsets[1:].tolist()):
            ids[start:end] = token_ids(example)
            labels[start:end] = np.where(loss_mask(example) != 0, ids[start:end], IGNORE)
        return cls(ids, labels, offsets)

    def digest(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for array in (self.offsets, self.ids, self.labels):
            digest.update(array)
        return digest.hexdigest()


def to_dataset(examples: Sequence[Example]):
    """input_ids and labels columns; TRL then packs them (Arrow, no Python rows) or, unpacked, takes them as they are."""
    import pyarrow as pa
    from datasets import Dataset

    columns = TokenColumns.of(examples)
    # 32-bit offsets address 2^31 tokens; a larger set takes Arrow's 64-bit large lists
    kind, offsets = ((pa.ListArray, columns.offsets.astype(np.int32)) if columns.offsets[-1] < 1 << 31
                     else (pa.LargeListArray, columns.offsets))
    table = pa.table({"input_ids": kind.from_arrays(offsets, columns.ids),
                      "labels": kind.from_arrays(offsets, columns.labels)})
    # Without a fingerprint, datasets makes one by pickling the whole table: a transient ~4x the token
    # columns (measured: +1.1 GB at 200K conversations). A digest of the arrays names the same content.
    return Dataset(table, fingerprint=columns.digest())
