"""Hamming search over packed binary codes: exact (faiss ``IndexBinaryFlat``) or hashed (``IndexBinaryMultiHash``).

Codes are packed as the model's pyfunc returns them (``cluster.tracking.HashCodeModel``): bit j of a video is
1 where its code is > 0, packed big-endian per byte with ``np.packbits``, so (N, nbits) codes become
(N, nbits / 8) uint8 rows. :func:`pack_codes` does that for int8 codes in {-1, 0, +1}; a 0 (sign tie) packs as
0, so packed distances can differ from :mod:`autossvh.metrics`'s 0.5-per-zero-bit distances.

Ranking, as in the evaluation protocol: ascending Hamming distance, ties broken by ascending database index.

* ``flat`` is exact, ties included. A faiss k-NN heap returns the right k distances but an arbitrary subset
  of the items tied at the k-th distance, in arbitrary order. So it asks faiss for ``2k + 64`` candidates and
  re-sorts them by (distance, index). When the last candidate is farther than the k-th, every item at or
  below the k-th distance is among the candidates and the re-sorted first k are exact. Otherwise the ties
  overflow the candidates (many duplicate codes). Those queries keep their candidates below the k-th
  distance, which are complete, and take the rest from a scan of the database in ascending index order
  (numpy popcount in blocks) for the first items at exactly the k-th distance. The scan stops as soon as it
  has enough, so dense ties end it early.
* ``multihash`` is approximate: it may miss items. It is multi-index hashing (Norouzi et al.): the code is
  split into ``nhash`` substrings of ``b`` bits, each with a hash table, and every bucket within ``nflip = 2``
  bits of a query's substring is probed. Any item within distance ``3 * nhash - 1`` of the query shares a
  substring within 2 bits, so it is always a candidate; farther items are found only by chance.
  :func:`multihash_params` takes ``b = ceil(log2 N)`` (about one code per bucket), at most ``nbits // 3`` so
  that there are at least three tables: at 64 bits, 20-bit substrings in 3 tables over 1M codes, every item
  within 8 bits found. Like flat, it asks for ``2k + 64`` candidates and keeps the first k by (distance,
  index), so ties among what it found go to the smallest indices. Missing slots have index -1 and distance
  ``MISSING_DISTANCE`` and come last. At 16 or 32 bits the code space is small and hashing gains little.
* ``auto`` picks ``flat`` up to ``FLAT_MAX_CODES`` database codes and ``multihash`` above.

``k`` larger than the database is clamped: a search returns ``min(k, N)`` columns, the whole database ranked.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

__all__ = ["FLAT_MAX_CODES", "INDEX_KINDS", "MISSING_DISTANCE", "HammingIndex", "IndexKind", "multihash_params",
           "pack_codes"]

IndexKind = Literal["auto", "flat", "multihash"]
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "multihash")
FLAT_MAX_CODES = 1_000_000  # "auto" searches exactly up to this many database codes
MISSING_DISTANCE = int(np.iinfo(np.int32).max)  # distance of a slot the hashing index could not fill (index -1)
CANDIDATE_FACTOR = 2  # flat search asks faiss for CANDIDATE_FACTOR * k + CANDIDATE_MARGIN candidates
CANDIDATE_MARGIN = 64
MULTIHASH_MIN_TABLES = 3  # substrings of at most nbits // 3 bits
MULTIHASH_NFLIP = 2  # probe every bucket within this many bits of the query's substring
_SCAN_BLOCK_BYTES = 1 << 24  # XOR working set of the tie scan: 16 MB
_SCAN_QUERIES = 256  # queries per tie scan


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(N, nbits) codes in {-1, 0, +1} → (N, nbits / 8) uint8, bit = code > 0, big-endian per byte."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D (N, nbits) array, got shape {codes.shape}")
    if codes.shape[1] == 0 or codes.shape[1] % 8:
        raise ValueError(f"codes must have a positive multiple of 8 bits, got {codes.shape[1]}")
    if not np.issubdtype(codes.dtype, np.number) or codes.dtype == np.bool_:
        raise ValueError(f"codes must be numeric in {{-1, 0, +1}}, got dtype {codes.dtype}")
    if not np.isin(codes, (-1, 0, 1)).all():
        raise ValueError("codes must hold only -1, 0 and +1")
    return np.packbits(codes > 0, axis=1)


def multihash_params(nbits: int, size: int) -> tuple[int, int]:
    """(nhash, b) of the hashing index for ``size`` codes of ``nbits`` bits: ``b = ceil(log2 size)``, at most
    ``nbits // 3`` (at least 1), and ``nhash = nbits // b`` tables."""
    substring_bits = max(1, min(int(np.ceil(np.log2(max(size, 2)))), nbits // MULTIHASH_MIN_TABLES))
    return nbits // substring_bits, substring_bits


def _check_packed(codes: np.ndarray, name: str, nbytes: int | None = None) -> np.ndarray:
    """A C-contiguous (rows, nbytes) uint8 array, or ValueError naming what is wrong."""
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        dtype = getattr(codes, "dtype", type(codes).__name__)
        raise ValueError(f"{name} must be a uint8 numpy array of packed codes, got {dtype}")
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (rows, nbits / 8) with at least one byte, got shape {codes.shape}")
    if nbytes is not None and codes.shape[1] != nbytes:
        raise ValueError(f"{name} are {codes.shape[1] * 8}-bit codes, the index holds {nbytes * 8}-bit codes")
    return np.ascontiguousarray(codes)


class HammingIndex:
    """Top-k Hamming search over a database of packed codes (N, nbits / 8) uint8; see the module docstring.
    The flat tie scan reads ``codes`` without copying them: leave them unchanged while the index is in use."""

    def __init__(self, codes: np.ndarray, kind: IndexKind = "auto") -> None:
        self.codes = _check_packed(codes, "database codes")
        if len(self.codes) == 0:
            raise ValueError("the database holds no codes")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
        self.kind = ("flat" if len(self.codes) <= FLAT_MAX_CODES else "multihash") if kind == "auto" else kind
        self.nbits = self.codes.shape[1] * 8
        if self.kind == "flat":
            self.index = faiss.IndexBinaryFlat(self.nbits)
        else:
            self.index = faiss.IndexBinaryMultiHash(self.nbits, *multihash_params(self.nbits, len(self.codes)))
            self.index.nflip = MULTIHASH_NFLIP
        self.index.add(self.codes)

    def __len__(self) -> int:
        return len(self.codes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Q, min(k, N)) int32 and database indices (Q, min(k, N)) int64 of each query's nearest
        codes, by ascending distance, then ascending index (exact for ``flat``)."""
        queries = _check_packed(queries, "query codes", self.codes.shape[1])
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        k = min(int(k), len(self.codes))
        if len(queries) == 0:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.int64)
        fetch = min(len(self.codes), CANDIDATE_FACTOR * k + CANDIDATE_MARGIN)
        distances, indices = _sort_rows(*self.index.search(queries, fetch))
        if self.kind == "flat":
            return self._exact_ties(queries, distances, indices, k)
        return distances[:, :k].copy(), indices[:, :k].copy()

    def _exact_ties(self, queries: np.ndarray, distances: np.ndarray, indices: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first k of the sorted flat candidates, with the ties at the k-th distance that overflowed the
        candidates replaced by the smallest tied indices."""
        boundary = distances[:, k - 1]
        overflow = np.flatnonzero((distances[:, -1] == boundary) & (distances.shape[1] < len(self.codes)))
        distances, indices = distances[:, :k].copy(), indices[:, :k].copy()
        for group_start in range(0, len(overflow), _SCAN_QUERIES):
            group = overflow[group_start:group_start + _SCAN_QUERIES]
            # Columns from the first one at the boundary distance on hold ties (already the right distance)
            # whose indices are an arbitrary subset: replace them with the smallest tied indices.
            first_tie = (distances[group] < boundary[group, None]).sum(axis=1)
            indices[group] = self._fill_ties(queries[group], boundary[group], first_tie, indices[group])
        return distances, indices

    def _fill_ties(self, queries: np.ndarray, distance: np.ndarray, first: np.ndarray,
                   indices: np.ndarray) -> np.ndarray:
        """``indices`` with row i's columns ``first[i]:`` replaced by the smallest database indices at Hamming
        distance exactly ``distance[i]``, scanning the database in ascending order until every row is full."""
        word = next(dtype for dtype in (np.uint64, np.uint32, np.uint16, np.uint8)
                    if self.codes.shape[1] % np.dtype(dtype).itemsize == 0)
        database, queries = self.codes.view(word), np.ascontiguousarray(queries).view(word)
        indices, filled, k = indices.copy(), first.astype(np.int64), indices.shape[1]
        block = max(1, _SCAN_BLOCK_BYTES // (self.codes.shape[1] * len(queries)))
        for start in range(0, len(database), block):
            active = np.flatnonzero(filled < k)
            if not len(active):
                break
            xor = queries[active, None, :] ^ database[None, start:start + block, :]
            hit = np.bitwise_count(xor).sum(axis=2, dtype=np.int32) == distance[active, None]
            column = np.cumsum(hit, axis=1) + filled[active, None] - 1  # where each hit goes in its row
            take = hit & (column < k)
            rows, cols = np.nonzero(take)
            indices[active[rows], column[rows, cols]] = start + cols
            filled[active] += take.sum(axis=1)
        return indices


def _sort_rows(distances: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by (distance, index); missing slots (index -1) last with MISSING_DISTANCE."""
    missing = indices < 0
    distances = np.where(missing, MISSING_DISTANCE, distances).astype(np.int32)
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, indices), distances), axis=-1)
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1).astype(np.int64)
