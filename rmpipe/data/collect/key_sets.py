"""Sets of 16-byte digests kept as sorted numpy arrays: 24 bytes per member instead of ~130.

Collect remembers one key per accepted vote (a second vote by one annotator on one pair is a
duplicate, however many batches later) and one per distinct pair (the report's count). In a
Python dict or set each costs a bytes object, an int and a hash slot; at millions of votes that
was most of collect's memory. Here a member is its digest split into two big-endian uint64
halves (sorted by the first) and an int64 value, found by binary search, a chunk at a time.

Exact: members are compared on all 16 bytes. Digest collisions are the only way two different
keys could meet, as with any digest-keyed table (blake2b-128: never in practice).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rmpipe.data.collect.text_columns import byte_slices

DIGEST_BYTES = 16
_HALVES = np.dtype(">u8")


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def digests_of(values: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """The digest of each string's UTF-8 bytes, straight from Arrow's buffers."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return [digest(view) for view in byte_slices(values)]


def joined_digests(first: pa.Array | pa.ChunkedArray, second: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """`vote_key(a, b)` for each row, computed on the columns: a's UTF-8 length, ":", a, b."""
    sizes = pc.cast(pc.binary_length(first), pa.string())
    return digests_of(pc.binary_join_element_wise(sizes, ":", first, second, ""))


def halves(keys: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """16-byte keys as (first 8 bytes, last 8 bytes), each an unsigned 64-bit integer array."""
    packed = Packed.from_bytes(b"".join(keys))
    return packed.high, packed.low


@dataclass(frozen=True)
class Packed:
    """16-byte keys as two uint64 arrays (the big-endian halves: they sort as the bytes do), no object per key.
    What collect's memo keeps on disk as the keys' bytes, read back without a bytes object per key."""

    high: np.ndarray
    low: np.ndarray

    @staticmethod
    def of(keys: Keys) -> Packed:
        return keys if isinstance(keys, Packed) else Packed.from_bytes(b"".join(keys))

    @staticmethod
    def from_bytes(data: bytes) -> Packed:
        packed = np.frombuffer(data, dtype=_HALVES).reshape(-1, 2)
        return Packed(packed[:, 0].astype(np.uint64), packed[:, 1].astype(np.uint64))

    def to_bytes(self) -> bytes:
        return np.stack([self.high, self.low], axis=1).astype(_HALVES).tobytes()

    def __len__(self) -> int:
        return len(self.high)


Keys = Union[list[bytes], Packed]  # digests as bytes objects, or packed


class DigestSet:
    """Distinct 16-byte keys, each with an int64 value."""

    def __init__(self) -> None:
        self.high = np.zeros(0, np.uint64)  # sorted
        self.low = np.zeros(0, np.uint64)
        self.values = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.high)

    def find(self, keys: Keys) -> np.ndarray:
        """The value of each key; -1 where it is not a member."""
        packed = Packed.of(keys)
        high, low = packed.high, packed.low
        found = np.full(len(high), -1, np.int64)
        if not len(self) or not len(keys):
            return found
        order = np.argsort(high)  # sorted needles: the search walks the table once, cache-friendly
        start = np.empty_like(order)
        start[order] = np.searchsorted(self.high, high[order])
        inside = np.minimum(start, len(self) - 1)
        hit = np.flatnonzero(self.high[inside] == high)
        same = self.low[start[hit]] == low[hit]
        found[hit[same]] = self.values[start[hit[same]]]
        for i in hit[~same]:  # equal first halves, different keys: look further (never, in practice)
            j = start[i] + 1
            while j < len(self) and self.high[j] == high[i]:
                if self.low[j] == low[i]:
                    found[i] = self.values[j]
                    break
                j += 1
        return found

    def add(self, keys: Keys, values: np.ndarray | int = 0) -> None:
        """Add keys not yet members and distinct from each other (the caller ensures both)."""
        if not len(keys):
            return
        packed = Packed.of(keys)
        high, low = packed.high, packed.low
        values = np.broadcast_to(np.asarray(values, np.int64), high.shape)
        order = np.argsort(high, kind="stable")
        at = np.searchsorted(self.high, high[order])
        self.high = np.insert(self.high, at, high[order])
        self.low = np.insert(self.low, at, low[order])
        self.values = np.insert(self.values, at, values[order])

    def digests(self) -> list[bytes]:
        """The members, sorted."""
        packed = self.packed().to_bytes()
        return [packed[start:start + DIGEST_BYTES] for start in range(0, len(packed), DIGEST_BYTES)]

    def packed(self) -> Packed:
        """The members, sorted, packed."""
        return Packed(self.high, self.low)

    def update(self, keys: Keys) -> None:
        """Add the keys that are not members yet (repeats among them once)."""
        packed = Packed.of(keys)
        fresh = np.flatnonzero(self.find(packed) < 0)
        high, low = packed.high[fresh], packed.low[fresh]
        order = np.lexsort((low, high))
        first = np.ones(len(order), bool)
        first[1:] = (high[order][1:] != high[order][:-1]) | (low[order][1:] != low[order][:-1])
        self.add(Packed(high[order][first], low[order][first]))


def vote_key(annotator: str, pair_id: str) -> bytes:
    """16 bytes standing for (annotator, pair): duplicates are found by key, without holding texts.

    The annotator is length-prefixed, so no id can pose as another pair: with a separator instead, an
    annotator or pair id holding that separator made two different votes one key (a false duplicate)."""
    head = annotator.encode("utf-8", "surrogatepass")
    return digest(b"%d:%s%s" % (len(head), head, pair_id.encode("utf-8", "surrogatepass")))


@dataclass(frozen=True)
class KeyLines:
    """A batch's vote keys (packed) and the line of each: what collect's memo hands back, no object per vote."""

    keys: Packed
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


class SeenVotes:
    """Keys of the votes already in the table -> where (batch, line), packed in one int per vote."""

    def __init__(self) -> None:
        self._where = DigestSet()
        self._batches: list[str] = []

    def add(self, batch_id: str, keys: Mapping[bytes, int] | KeyLines) -> None:
        base = len(self._batches) << 40
        self._batches.append(batch_id)
        if isinstance(keys, KeyLines):
            self._where.add(keys.keys, base | keys.lines.astype(np.int64))
        else:
            self._where.add(list(keys), base | np.fromiter(keys.values(), np.int64, len(keys)))

    def where_each(self, keys: list[bytes]) -> list[str | None]:
        """Where each key's vote is ("<batch> line <n>"), None for a key not seen, a chunk at once."""
        mask = (1 << 40) - 1
        return [None if packed < 0 else f"{self._batches[packed >> 40]} line {packed & mask}"
                for packed in self._where.find(keys).tolist()]

    def any_of(self, keys: Iterable[bytes] | KeyLines) -> bool:
        return bool((self._where.find(keys.keys if isinstance(keys, KeyLines) else list(keys)) >= 0).any())
