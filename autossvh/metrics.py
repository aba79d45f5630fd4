"""Retrieval metrics for binary video hashing: the published AutoSSVH/ConMH/S5VH protocol, made exact.

Protocol (REFERENCE.md §8):

* Codes hold values in {-1, 0, +1} (a 0 bit comes from sign(0) and contributes 0.5 to every distance).
  Hamming distance d(q, j) = 0.5 * (nbits - q . db_j), so distances are multiples of 0.5.
* Labels are (N, C) multi-hot matrices; database item j is relevant to query q iff they share at least one
  label, i.e. labels_db[j] . labels_q > 0 (labels must be non-negative).
* mAP@K: AP@K(q) = (1/K) * sum_{i<=K} rel(i) * (sum_{j<=i} rel(j)) / i, averaged over all queries. The
  denominator is K, as in the released code, not the number of relevant items.
* Tie rule: the database is ranked by ascending Hamming distance and ties are broken by ascending database
  index (a stable sort). The released code uses numpy's unstable default argsort, whose tie order depends on
  the platform; this module is deterministic instead.

Nothing here builds a full query x database matrix. The ranking is faiss's exact binary k-NN by counting
(``IndexBinaryFlat`` with ``use_heap = False``, i.e. ``hammings_knn_mc``), run on chunks of query rows: per
query it scans the database in ascending index order and appends each item to the list of its distance while
that list can still reach the top k, then returns the lists by ascending distance. The result is therefore
exactly the stable order, ties that straddle the K-th distance included, from the algorithm itself: no
candidate margin, re-sort or fallback scan is needed (unlike ``autossvh.search``, which does not rely on
faiss's tie order). It is also faster than faiss's default heap search. Codes are bit-packed so that faiss's
Hamming distance is a fixed multiple of the protocol distance: +-1 codes take one bit per code bit (bit =
code > 0, the same distance); codes with any 0, on either side, take four bits per code bit, with a query
pattern and a database pattern whose Hamming distance is 2 * (1 - q_b * db_b), i.e. 4x the distance (exact,
at a wider and slower search). Relevance of each ranked item is an AND of packed label words, and the AP sums
are accumulated as exact integers per rank (sum over queries of rel(i) * hits up to i), so the result does
not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import faiss
import numpy as np
import torch

__all__ = [
    "DEFAULT_KS",
    "gmap_l2",
    "hamming_ranking",
    "leave_one_out_map",
    "map_at_k",
    "precision_recall_by_radius",
]

DEFAULT_KS: tuple[int, ...] = (5, 20, 40, 60, 80, 100)

_CHUNK_ELEMENTS = 1 << 22  # elements of one (chunk rows x N_db) working matrix: 16 MB in float32
_FLOAT32_EXACT = 1 << 24  # integers up to this magnitude are exact in float32
_RANKED_ELEMENTS = 1 << 18  # entries of one chunk's (query rows x k) ranking: 2 MB per int64 array
_KNN_BUFFER_BYTES = 1 << 26  # faiss's per-batch lists (queries x (distances) x k int64) stay under 64 MB
# Four bits per code bit when codes contain 0, indexed by code + 1 (-1, 0, +1). The query and database
# patterns differ only for 0, so the Hamming distance of two patterns is 2 * (1 - q_b * db_b).
_QUERY_NIBBLES = np.array([[0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)
_DB_NIBBLES = np.array([[0, 0, 1, 1], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=bool)


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or array-like to a numpy array without copying when possible."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} cannot be converted to an array: {exc}") from exc


def _check_codes(x: Any, name: str) -> np.ndarray:
    """Validate a (N, nbits) code matrix with values in {-1, 0, +1}; return it as float32."""
    a = _to_numpy(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, nbits) array, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); need at least one code of at least one bit")
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be numeric with values in {{-1, 0, +1}}, got dtype {a.dtype}")
    if not np.all((a == 1) | (a == -1) | (a == 0)):
        bad = a[~((a == 1) | (a == -1) | (a == 0))]
        raise ValueError(f"{name} has codes not in {{-1, 0, +1}}; found e.g. {bad[0]!r}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_labels(x: Any, name: str, n_rows: int, codes_name: str) -> np.ndarray:
    """Validate a (N, C) non-negative multi-hot label matrix matching its codes; return it as bool."""
    a = _to_numpy(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) multi-hot array, got shape {a.shape}")
    if a.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {a.shape[0]} rows but {codes_name} has {n_rows}; label rows must match code rows"
        )
    if a.shape[1] == 0:
        raise ValueError(f"{name} has no label columns (shape {a.shape})")
    if a.dtype != np.bool_:
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"{name} must be numeric or bool, got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if np.any(a < 0):
            raise ValueError(f"{name} contains negative values; labels must be non-negative multi-hot")
        a = a != 0
    return np.ascontiguousarray(a)


def _check_code_pair(query_codes: Any, db_codes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate query and database codes of the same length."""
    q = _check_codes(query_codes, "query_codes")
    db = _check_codes(db_codes, "db_codes")
    if q.shape[1] != db.shape[1]:
        raise ValueError(
            f"mismatched nbits: query_codes have {q.shape[1]} bits but db_codes have {db.shape[1]} bits"
        )
    return q, db


def _check_pair(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the four inputs of an evaluation together."""
    q, db = _check_code_pair(query_codes, db_codes)
    lq = _check_labels(query_labels, "query_labels", q.shape[0], "query_codes")
    ldb = _check_labels(db_labels, "db_labels", db.shape[0], "db_codes")
    if lq.shape[1] != ldb.shape[1]:
        raise ValueError(
            f"mismatched label width: query_labels have {lq.shape[1]} columns, db_labels {ldb.shape[1]}"
        )
    return q, db, lq, ldb


def _check_chunk(chunk_size: int | None, default: int) -> int:
    """Resolve the number of query rows processed at once."""
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def _pack_labels(labels: np.ndarray) -> np.ndarray:
    """Pack bool (N, C) labels into (N, W) int64 bit words, so relevance is a bitwise AND."""
    packed = np.packbits(labels, axis=1)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.int64)


def _pack_for_hamming(q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Bit-pack validated codes for faiss; return ``(packed queries, packed database, scale)`` where
    faiss's Hamming distance = scale * protocol distance. Padding bits are 0 on both sides and add nothing."""
    if np.all(q != 0) and np.all(db != 0):
        return np.packbits(q > 0, axis=1), np.packbits(db > 0, axis=1), 1

    def expand(codes: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
        return np.packbits(nibbles[codes.astype(np.intp) + 1].reshape(len(codes), -1), axis=1)

    return expand(q, _QUERY_NIBBLES), expand(db, _DB_NIBBLES), 4


def _iter_topk(
    q: np.ndarray, db: np.ndarray, k: int, rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """Yield (start, indices, scaled distances, scale) per query chunk: the k nearest database items by
    ascending distance, ties by ascending index (faiss's counting k-NN, see the module docstring).

    ``indices`` are (rows, k) int64, distances (rows, k) int32 in units of 1 / scale of the protocol distance.
    faiss keeps per query one list of up to k ids for every distance, so its query batch is bounded to keep
    those lists under ``_KNN_BUFFER_BYTES`` (at least one query).
    """
    q_packed, db_packed, scale = _pack_for_hamming(q, db)
    index = faiss.IndexBinaryFlat(db_packed.shape[1] * 8)
    index.use_heap = False
    per_query = (index.d + 1) * k * np.dtype(np.int64).itemsize
    index.query_batch_size = max(1, min(index.query_batch_size, _KNN_BUFFER_BYTES // per_query))
    index.add(db_packed)
    for start in range(0, len(q_packed), rows):
        distances, indices = index.search(q_packed[start : start + rows], k)
        yield start, indices, distances, scale


def hamming_ranking(
    query_codes: Any, db_codes: Any, k: int, *, chunk_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database items per query by ascending Hamming distance, ties by ascending database index.

    Returns ``(indices, distances)``, both (Q, k): int64 database indices and float64 distances (multiples of
    0.5). ``chunk_size`` is the number of queries ranked at once (default: about 256K ranked entries). With
    k = N_db this is the full stable ranking; only use that on small inputs, as faiss holds (nbits + 1) * k
    int64 ids per query in flight (4 * nbits + 1 with 0 bits).
    """
    q, db = _check_code_pair(query_codes, db_codes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > db.shape[0]:
        raise ValueError(f"k={k} is larger than the database ({db.shape[0]} items)")
    k = int(k)
    rows = _check_chunk(chunk_size, max(1, _RANKED_ELEMENTS // k))
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)
    dist_out = np.empty((q.shape[0], k), dtype=np.float64)
    for start, idx, dist, scale in _iter_topk(q, db, k, rows):
        idx_out[start : start + len(idx)] = idx
        dist_out[start : start + len(idx)] = dist / scale
    return idx_out, dist_out


def _check_ks(ks: Iterable[int], n_db: int) -> list[int]:
    """Validate the cut-offs K: positive integers not larger than the database."""
    try:
        ks_list = list(ks)
    except TypeError as exc:
        raise ValueError(f"ks must be an iterable of positive integers, got {ks!r}") from exc
    if not ks_list:
        raise ValueError("ks is empty; give at least one cut-off K")
    out = []
    for k in ks_list:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every K in ks must be a positive integer, got {k!r}")
        if k > n_db:
            raise ValueError(f"K={k} is larger than the database ({n_db} items)")
        out.append(int(k))
    return out


def map_at_k(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """mAP@K for every K in ``ks`` under the published protocol with a deterministic tie rule.

    Codes are (N, nbits) in {-1, 0, +1}, labels (N, C) non-negative multi-hot; numpy arrays or torch tensors.
    The ranking is computed once for max(ks) and every K is read from it. ``chunk_size`` is the number of
    queries ranked at once (default: about 256K ranked entries per chunk). Returns {K: mAP@K} in the
    order of ``ks``. For FCVID pass the same codes and labels as queries and database: the self match
    (distance 0, placed among equal distances by index) is counted, as in the released evaluation.
    """
    q, db, lq, ldb = _check_pair(query_codes, db_codes, query_labels, db_labels)
    ks_list = _check_ks(ks, db.shape[0])
    kmax = max(ks_list)
    rows = _check_chunk(chunk_size, max(1, _RANKED_ELEMENTS // kmax))
    q_words = _pack_labels(lq)
    db_words = np.ascontiguousarray(_pack_labels(ldb).T)  # (W, N_db): one contiguous row per label word
    rel_hits = np.zeros(kmax, dtype=np.int64)  # per rank i: sum over queries of rel(i) * (hits up to i)
    for start, idx, _, _ in _iter_topk(q, db, kmax, rows):
        qw = q_words[start : start + len(idx)]
        rel = (db_words[0][idx] & qw[:, :1]) != 0
        for word in range(1, len(db_words)):
            rel |= (db_words[word][idx] & qw[:, word : word + 1]) != 0
        hits = np.cumsum(rel, axis=1, dtype=np.int64)
        rel_hits += (hits * rel).sum(axis=0)
    ap_sums = np.cumsum(rel_hits / np.arange(1, kmax + 1, dtype=np.float64))
    ks_arr = np.array(ks_list)
    maps = ap_sums[ks_arr - 1] / (q.shape[0] * ks_arr.astype(np.float64))
    return {k: float(v) for k, v in zip(ks_list, maps.tolist(), strict=True)}


def leave_one_out_map(codes: Any, labels: Any, k: int = 5) -> float:
    """mAP@``k`` of a labelled set of videos among themselves: each video is a query ranked against all the others
    (leave-one-out), with the protocol's AP@K (denominator K) and tie rule (ascending index). Model selection on a
    validation split held out of training (``--selection best-val-map5``): every video is used as a query and as
    database, and none is its own match. ``codes`` (N, nbits) in {-1, 0, +1}, ``labels`` (N, C); needs N > k.

    The video itself is never ranked after another video (no code is nearer to it than its own), so it is among
    its k + 1 nearest unless k + 1 others tie with it: dropping it, or else the (k + 1)-th, leaves the other
    videos' top k in the stable order."""
    c = _check_codes(codes, "codes")
    relevant = _check_labels(labels, "labels", c.shape[0], "codes")
    n = c.shape[0]
    if n <= k:
        raise ValueError(f"leave_one_out_map: {n} videos, need more than k = {k}")
    ranked, _ = hamming_ranking(c, c, k + 1)
    itself = ranked == np.arange(n)[:, None]
    drop = np.where(itself.any(axis=1), itself.argmax(axis=1), k)
    keep = np.ones_like(itself)
    keep[np.arange(n), drop] = False
    others = ranked[keep].reshape(n, k)
    words = _pack_labels(relevant)
    rel = ((words[others] & words[:, None, :]) != 0).any(axis=2)  # (N, k)
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    return float((rel * precision).sum(axis=1).mean() / k)


def gmap_l2(map_by_k: dict[int, float]) -> float:
    """The paper's "GMAP": sqrt(sum over K of mAP@K^2), the L2 norm of the mAP@K values.

    Paper Eq. 21 calls it a geometric mean, but the published Table 3 values are this L2 norm over
    K in {5, 20, 40, 60, 80, 100} (REFERENCE.md §8.5, §9.1); it can exceed 1.
    """
    if not map_by_k:
        raise ValueError("map_by_k is empty; need at least one mAP@K value")
    values = np.asarray(list(map_by_k.values()), dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"map_by_k contains non-finite values: {map_by_k}")
    return float(np.sqrt(np.sum(values**2)))


def precision_recall_by_radius(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean precision and recall of Hamming-ball retrieval for every integer radius r = 0..nbits.

    A query retrieves every database item with distance d <= r (distances are multiples of 0.5 when codes
    contain 0, so an item at d = r + 0.5 enters at radius r + 1). Per query, precision = #relevant retrieved /
    #retrieved, defined as 0 when nothing is retrieved, and averaged over all queries; recall = #relevant
    retrieved / #relevant in the database, averaged over the queries that have at least one relevant item
    (NaN if none has). Returns ``(radii, precision, recall)``: int64 radii and float64 arrays of nbits + 1.

    Per query chunk, each database item adds one to a histogram bin indexed by (row, 2 * distance, relevant);
    relevance is taken from the distinct database label rows, so no full query x database matrix is built.
    """
    q, db, lq, ldb = _check_pair(query_codes, db_codes, query_labels, db_labels)
    n_db, nbits = db.shape
    n_bins = 2 * (2 * nbits + 1)  # per query: (level 0..2*nbits) x (irrelevant, relevant)
    packed = _pack_labels(ldb)
    _, first, group = np.unique(
        packed.view(np.dtype((np.void, packed.shape[1] * 8))).ravel(), return_index=True, return_inverse=True
    )
    group_t = torch.from_numpy(np.asarray(group, dtype=np.int64).reshape(-1))
    uniq_t = torch.from_numpy(ldb[first].astype(np.float32)).T.contiguous()  # (C, U) distinct label rows
    max_rows = max(1, (_FLOAT32_EXACT - 1) // n_bins)  # bin indices stay exact in float32
    rows = min(_check_chunk(chunk_size, max(1, _CHUNK_ELEMENTS // max(n_db, len(first)))), max_rows)
    qt = torch.from_numpy(q)
    db_m2 = torch.from_numpy(-2.0 * db).T.contiguous()
    prec_sum = np.zeros(nbits + 1, dtype=np.float64)
    rec_sum = np.zeros(nbits + 1, dtype=np.float64)
    n_with_rel = 0
    for start in range(0, q.shape[0], rows):
        qc = qt[start : start + rows]
        m = qc.shape[0]
        rel_groups = (torch.from_numpy(lq[start : start + m].astype(np.float32)) @ uniq_t > 0).float()
        rel_groups += (torch.arange(m, dtype=torch.float32) * n_bins + 2 * nbits)[:, None]
        bins = rel_groups.index_select(1, group_t)
        bins.addmm_(qc, db_m2)  # row * n_bins + 2 * (nbits - dot) + relevant
        index_dtype = torch.int16 if m * n_bins <= np.iinfo(np.int16).max else torch.int32
        hist = torch.bincount(bins.to(index_dtype).reshape(-1), minlength=m * n_bins).numpy()
        hist = hist.reshape(m, -1, 2)
        cum_all = np.cumsum(hist.sum(axis=2), axis=1)[:, ::2].astype(np.float64)  # levels 2r: d <= r
        cum_rel = np.cumsum(hist[:, :, 1], axis=1)[:, ::2].astype(np.float64)
        prec_sum += (cum_rel / np.maximum(cum_all, 1)).sum(axis=0)  # 0 where nothing is retrieved
        total_rel = cum_rel[:, -1:]
        has_rel = total_rel[:, 0] > 0
        n_with_rel += int(has_rel.sum())
        rec_sum += (cum_rel[has_rel] / total_rel[has_rel]).sum(axis=0)
    precision = prec_sum / q.shape[0]
    recall = rec_sum / n_with_rel if n_with_rel else np.full(nbits + 1, np.nan)
    return np.arange(nbits + 1, dtype=np.int64), precision, recall


def knn_agreement(codes: np.ndarray, features: np.ndarray, k: int = 10) -> float:
    """Label-free model selection: the mean share of each video's ``k`` nearest neighbours by Hamming distance of
    ``codes`` (N, nbits) in {-1, 0, +1} that are also among its ``k`` nearest by cosine of the pooled input
    ``features`` (N, F) centred on their mean (the video itself left out of both). 1 when the codes keep the
    input's neighbourhoods; about k / N for unrelated codes. Hamming ties are broken by index."""
    n = len(codes)
    if n <= k:
        raise ValueError(f"knn_agreement: {n} videos, need more than k = {k}")
    c = codes.astype(np.float32)
    hamming = -(c @ c.T)  # rank-equivalent to the Hamming distance for codes of equal length
    centred = features - features.mean(0)
    z = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    cosine = -(z @ z.T)
    np.fill_diagonal(hamming, np.inf)
    np.fill_diagonal(cosine, np.inf)
    by_code = np.argsort(hamming, axis=1, kind="stable")[:, :k]
    by_input = np.argpartition(cosine, k, axis=1)[:, :k]
    shared = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(by_code, by_input, strict=True)]
    return float(np.mean(shared) / k)
