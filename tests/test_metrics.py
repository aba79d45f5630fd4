"""Retrieval metrics: the REFERENCE.md §8.4 test vector, equality with a dense reference, PR, GMAP, plots."""

import faiss
import numpy as np
import pytest
import torch

from autossvh import metrics
from autossvh.metrics import (
    gmap_l2,
    hamming_ranking,
    leave_one_out_map,
    map_at_k,
    precision_recall_by_radius,
)

# REFERENCE.md §8.4: nbits = 8, 6 database items, 3 queries, 3 classes.
_DB = ["+-+++-+-", "-------+", "+----++-", "++++++--", "--+-+++-", "-+-+--++"]
_Q = ["-+----++", "-+-+-+-+", "+-++++--"]
_DB_LABELS = [{0}, {1}, {0}, {2}, {0, 1}, {1}]
_Q_LABELS = [{0}, {1}, {2}]
# Hamming distances, rows db0..db5, columns q0..q2.
_DIST = np.array([[6, 7, 2], [2, 3, 6], [4, 5, 4], [7, 4, 1], [5, 6, 3], [1, 2, 7]], dtype=float)
_RANKING = [[5, 1, 2, 4, 0, 3], [5, 1, 3, 2, 4, 0], [3, 0, 4, 2, 1, 5]]
_MAP = {1: 0.6666666667, 2: 0.5, 3: 0.3703703704, 5: 0.3355555556, 6: 0.2796296296}


def _codes(rows: list[str]) -> np.ndarray:
    return np.array([[1 if c == "+" else -1 for c in r] for r in rows], dtype=np.float32)


def _multi_hot(sets: list[set[int]], n_classes: int) -> np.ndarray:
    out = np.zeros((len(sets), n_classes), dtype=np.int64)
    for i, s in enumerate(sets):
        out[i, sorted(s)] = 1
    return out


def _toy() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return _codes(_Q), _codes(_DB), _multi_hot(_Q_LABELS, 3), _multi_hot(_DB_LABELS, 3)


def _dense_map(q, db, lq, ldb, ks) -> dict[int, float]:
    """Straightforward reference: full distance matrix, stable argsort, the released AP@K loop."""
    dist = 0.5 * (q.shape[1] - q.astype(np.float64) @ db.astype(np.float64).T)
    order = np.argsort(dist, axis=1, kind="stable")
    rel = (lq.astype(np.float64) @ ldb.astype(np.float64).T) > 0
    out = {}
    for k in ks:
        aps = []
        for row in range(q.shape[0]):
            hits, p = 0, 0.0
            for i in range(k):
                if rel[row, order[row, i]]:
                    hits += 1
                    p += hits / (i + 1)
            aps.append(p / k)
        out[k] = float(np.mean(aps))
    return out


def _dense_pr(q, db, lq, ldb) -> tuple[np.ndarray, np.ndarray]:
    nbits = q.shape[1]
    dist = 0.5 * (nbits - q.astype(np.float64) @ db.astype(np.float64).T)
    rel = (lq.astype(np.float64) @ ldb.astype(np.float64).T) > 0
    total = rel.sum(1)
    has = total > 0
    prec, rec = [], []
    for r in range(nbits + 1):
        retrieved = dist <= r
        n_ret = retrieved.sum(1)
        n_hit = (retrieved & rel).sum(1)
        prec.append(np.where(n_ret > 0, n_hit / np.maximum(n_ret, 1), 0.0).mean())
        rec.append((n_hit[has] / total[has]).mean())
    return np.array(prec), np.array(rec)


def _tied_data(n_q: int, n_db: int, nbits: int, seed: int, zero_frac: float = 0.05):
    """Codes drawn from few prototypes with few flips (many exact ties), some 0 bits, multi-hot labels."""
    rng = np.random.default_rng(seed)
    protos = rng.choice([-1.0, 1.0], size=(6, nbits))

    def draw(n: int) -> np.ndarray:
        c = protos[rng.integers(0, len(protos), n)] * np.where(rng.random((n, nbits)) < 0.08, -1.0, 1.0)
        c[rng.random((n, nbits)) < zero_frac] = 0.0
        return c.astype(np.float32)

    def labels(n: int) -> np.ndarray:
        lab = (rng.random((n, 10)) < 0.15).astype(np.int64)
        lab[rng.random(n) < 0.05] = 0  # some items have no label at all: never relevant
        return lab

    return draw(n_q), draw(n_db), labels(n_q), labels(n_db)


# (a) the worked example


def test_worked_example_distances_and_ranking() -> None:
    q, db, _, _ = _toy()
    idx, dist = hamming_ranking(q, db, 6)
    assert idx.tolist() == _RANKING
    full = np.empty((6, 3))
    for col in range(3):
        full[idx[col], col] = dist[col]
    np.testing.assert_array_equal(full, _DIST)


def test_worked_example_map_table() -> None:
    q, db, lq, ldb = _toy()
    got = map_at_k(q, db, lq, ldb, ks=(1, 2, 3, 5, 6))
    assert list(got) == [1, 2, 3, 5, 6]
    for k, expected in _MAP.items():
        assert got[k] == pytest.approx(expected, abs=1e-9)
    assert got[5] == pytest.approx((0.28666666667 + 0.52 + 0.2) / 3, abs=1e-9)


def test_worked_example_accepts_torch_and_bool_labels() -> None:
    q, db, lq, ldb = _toy()
    got = map_at_k(torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(lq).bool(), ldb.astype(float),
                   ks=(1, 2, 3, 5, 6))
    assert got == map_at_k(q, db, lq, ldb, ks=(1, 2, 3, 5, 6))


# (b) fast path == dense reference

_KS = (1, 5, 17, 40, 100, 333, 700)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_ranking_and_map_equal_dense_reference(chunk_size: int | None) -> None:
    q, db, lq, ldb = _tied_data(300, 700, 16, seed=1)
    dist = 0.5 * (16 - q.astype(np.float64) @ db.astype(np.float64).T)
    order = np.argsort(dist, axis=1, kind="stable")
    # the chosen cut-offs really cut through ties for most queries
    for k in (5, 17, 40, 100):
        straddle = dist[np.arange(300), order[:, k - 1]] == dist[np.arange(300), order[:, k]]
        assert straddle.mean() > 0.5
    assert np.any(dist % 1 == 0.5)  # 0 bits give half-integer distances
    idx, d = hamming_ranking(q, db, 700, chunk_size=chunk_size)
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(d, np.take_along_axis(dist, order, 1))
    got = map_at_k(q, db, lq, ldb, ks=_KS, chunk_size=chunk_size)
    ref = _dense_map(q, db, lq, ldb, _KS)
    for k in _KS:
        assert got[k] == pytest.approx(ref[k], abs=1e-12)


def test_never_builds_a_full_query_by_database_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both functions work on chunks of query rows: spy on the faiss searches of map_at_k and the matmuls of
    precision_recall_by_radius."""
    searched: list[int] = []
    shapes: list[tuple[int, ...]] = []
    real_search, real_mm, real_addmm = faiss.IndexBinaryFlat.search, torch.mm, torch.Tensor.addmm_

    def search(self, x, k, **kw):
        searched.append(x.shape[0])
        return real_search(self, x, k, **kw)

    def mm(a, b, **kw):
        shapes.append((a.shape[0], b.shape[1]))
        return real_mm(a, b, **kw)

    def addmm_(self, a, b, **kw):
        shapes.append(tuple(self.shape))
        return real_addmm(self, a, b, **kw)

    monkeypatch.setattr(faiss.IndexBinaryFlat, "search", search)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch.Tensor, "addmm_", addmm_)
    q, db, lq, ldb = _tied_data(120, 300, 16, seed=8)
    map_at_k(q, db, lq, ldb, ks=(5,), chunk_size=25)
    precision_recall_by_radius(q, db, lq, ldb, chunk_size=25)
    assert searched == [25, 25, 25, 25, 20]
    assert {s for s in shapes if s[1] == 300} == {(25, 300), (20, 300)}


def _stable_reference(q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking by brute force: protocol distances and a stable argsort (ties by ascending index)."""
    dist = 0.5 * (q.shape[1] - q.astype(np.float64) @ db.astype(np.float64).T)
    order = np.argsort(dist, axis=1, kind="stable")
    return order, np.take_along_axis(dist, order, axis=1)


@pytest.mark.parametrize("zero_frac", [0.0, 0.1])
@pytest.mark.parametrize(("n_q", "n_db", "nbits"), [(90, 400, 4), (400, 150, 5), (60, 500, 8)])
def test_ranking_and_map_equal_brute_force_under_heavy_ties(
    n_q: int, n_db: int, nbits: int, zero_frac: float
) -> None:
    """4-8 bits leave a handful of distances, so nearly every cut-off falls inside a run of ties."""
    q, db, lq, ldb = _tied_data(n_q, n_db, nbits, seed=nbits, zero_frac=zero_frac)
    assert np.any(q == 0) == (zero_frac > 0)
    order, dist = _stable_reference(q, db)
    ks = (1, 3, 10, 37, n_db // 2, n_db)
    straddle = dist[:, [k - 1 for k in ks[:-1]]] == dist[:, list(ks[:-1])]
    assert straddle.mean() > 0.8  # the K-th item ties with the next one almost everywhere
    for k in (1, 10, n_db):
        idx, d = hamming_ranking(q, db, k, chunk_size=17)
        np.testing.assert_array_equal(idx, order[:, :k])
        np.testing.assert_array_equal(d, dist[:, :k])
    assert map_at_k(q, db, lq, ldb, ks=ks) == pytest.approx(_dense_map(q, db, lq, ldb, ks), abs=1e-12)


@pytest.mark.parametrize("side", ["query", "database"])
def test_zeros_on_one_side_only_take_the_exact_path(side: str) -> None:
    """A 0 on either side switches both to the 0-aware packing: 0.5 per 0 bit, also against a +-1 code."""
    q, db, lq, ldb = _tied_data(80, 300, 6, seed=11, zero_frac=0.0)
    codes = q if side == "query" else db
    codes[np.random.default_rng(12).random(codes.shape) < 0.15] = 0.0
    order, dist = _stable_reference(q, db)
    idx, d = hamming_ranking(q, db, 300)
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(d, dist)
    ks = (1, 7, 50, 300)
    assert map_at_k(q, db, lq, ldb, ks=ks) == pytest.approx(_dense_map(q, db, lq, ldb, ks), abs=1e-12)


def test_ties_stay_in_index_order_across_faiss_database_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss scans the database in blocks of ``hamming_batch_size`` items; tiny blocks split every tie run."""
    monkeypatch.setattr(faiss.cvar, "hamming_batch_size", 7)
    q, db, _, _ = _tied_data(50, 400, 5, seed=13)
    order, _ = _stable_reference(q, db)
    np.testing.assert_array_equal(hamming_ranking(q, db, 120)[0], order[:, :120])


def test_bounded_faiss_query_batch_gives_the_same_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large k shrinks faiss's query batch (to one query here); the ranking does not change."""
    q, db, _, _ = _tied_data(40, 250, 8, seed=14)
    expected = hamming_ranking(q, db, 250)
    monkeypatch.setattr(metrics, "_KNN_BUFFER_BYTES", 1)
    got = hamming_ranking(q, db, 250)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_map_does_not_depend_on_the_chunking() -> None:
    """The AP sums are exact integers per rank, so every chunk size gives bit-identical mAP values."""
    q, db, lq, ldb = _tied_data(200, 700, 16, seed=15)
    results = [map_at_k(q, db, lq, ldb, ks=_KS, chunk_size=c) for c in (None, 1, 13, 200)]
    assert all(r == results[0] for r in results[1:])


def test_wide_labels_and_64_bits() -> None:
    """More than 64 label columns (several packed words) and 64-bit codes."""
    rng = np.random.default_rng(3)
    q = rng.choice([-1.0, 1.0], (40, 64)).astype(np.float32)
    db = np.concatenate([q, rng.choice([-1.0, 1.0], (160, 64)).astype(np.float32)])
    lq = (rng.random((40, 239)) < 0.01).astype(np.uint8)
    ldb = (rng.random((200, 239)) < 0.01).astype(np.uint8)
    ldb[:40] = lq
    ks = (1, 5, 20, 200)
    assert map_at_k(q, db, lq, ldb, ks=ks) == pytest.approx(_dense_map(q, db, lq, ldb, ks), abs=1e-12)


# (c) FCVID self-match


def test_self_match_is_counted_when_queries_are_the_database() -> None:
    rng = np.random.default_rng(4)
    codes = rng.choice([-1, 1], (400, 32)).astype(np.int8)
    assert len(np.unique(codes, axis=0)) == 400
    labels = np.eye(20, dtype=bool)[rng.integers(0, 20, 400)]
    idx, dist = hamming_ranking(codes, codes, 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(400))
    assert np.all(dist == 0)
    got = map_at_k(codes, codes, labels, labels, ks=(1, 5, 100))
    assert got[1] == 1.0
    assert got == pytest.approx(_dense_map(codes, codes, labels, labels, (1, 5, 100)), abs=1e-12)


def test_self_match_with_duplicate_codes_follows_index_order() -> None:
    q, _, lq, _ = _tied_data(250, 1, 8, seed=5, zero_frac=0.0)
    ks = (1, 10, 250)
    assert map_at_k(q, q, lq, lq, ks=ks) == pytest.approx(_dense_map(q, q, lq, lq, ks), abs=1e-12)


# (d) precision / recall


@pytest.mark.parametrize(("n_q", "nbits", "chunk_size"), [(300, 16, None), (300, 16, 11), (120, 64, None)])
def test_precision_recall_equal_dense_reference(n_q: int, nbits: int, chunk_size: int | None) -> None:
    q, db, lq, ldb = _tied_data(n_q, 700, nbits, seed=6)
    radii, prec, rec = precision_recall_by_radius(q, db, lq, ldb, chunk_size=chunk_size)
    ref_prec, ref_rec = _dense_pr(q, db, lq, ldb)
    np.testing.assert_array_equal(radii, np.arange(nbits + 1))
    np.testing.assert_allclose(prec, ref_prec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rec, ref_rec, rtol=0, atol=1e-12)
    assert np.all(np.diff(rec) >= 0)
    assert rec[-1] == pytest.approx(1.0)


def test_precision_recall_worked_example() -> None:
    q, db, lq, ldb = _toy()
    _, prec, rec = precision_recall_by_radius(q, db, lq, ldb)
    # radius 1: q0 retrieves db5 (irrelevant), q1 nothing (precision 0), q2 db3 (relevant)
    assert prec[1] == pytest.approx((0 + 0 + 1) / 3)
    assert rec[1] == pytest.approx((0 + 0 + 1) / 3)
    assert prec[0] == 0.0 and rec[0] == 0.0


def test_recall_is_nan_without_any_relevant_item() -> None:
    q, db, _, _ = _toy()
    lq = np.array([[1, 0], [1, 0], [1, 0]])
    ldb = np.tile([[0, 1]], (6, 1))
    _, prec, rec = precision_recall_by_radius(q, db, lq, ldb)
    assert np.all(prec == 0) and np.all(np.isnan(rec))


# (e) GMAP


def test_gmap_l2_reproduces_published_values() -> None:
    ucf16 = dict(zip((5, 20, 40, 60, 80, 100), (0.423, 0.343, 0.288, 0.244, 0.210, 0.184), strict=True))
    hmdb64 = dict(zip((5, 20, 40, 60, 80, 100), (0.256, 0.175, 0.137, 0.111, 0.090, 0.076), strict=True))
    assert gmap_l2(ucf16) == pytest.approx(0.719, abs=1e-3)
    assert gmap_l2(hmdb64) == pytest.approx(0.376, abs=1e-3)
    assert gmap_l2({5: 0.3, 20: 0.4}) == pytest.approx(0.5)


# (g) bad inputs


def _bad_cases():
    q, db, lq, ldb = _toy()
    two = q.copy()
    two[0, 0] = 2
    return [
        ((q[:, :4], db, lq, ldb), {}, "mismatched nbits"),
        ((q, db, lq[:2], ldb), {}, "label rows must match code rows"),
        ((q, db, lq, ldb[:, :2]), {}, "mismatched label width"),
        ((two, db, lq, ldb), {}, r"not in \{-1, 0, \+1\}"),
        ((q, db, lq, ldb), {"ks": (5, 7)}, "larger than the database"),
        ((q[:0], db, lq[:0], ldb), {}, "empty"),
        ((q, db[:0], lq, ldb[:0]), {}, "empty"),
        ((q[0], db, lq, ldb), {}, "2-D"),
        ((q, db, -lq, ldb), {}, "negative"),
        ((q, db, lq, ldb), {"ks": ()}, "ks is empty"),
        ((q, db, lq, ldb), {"ks": (0, 1)}, "positive integer"),
        ((q, db, lq, ldb), {"ks": (1,), "chunk_size": 0}, "chunk_size"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "message"), _bad_cases())
def test_map_at_k_rejects_bad_inputs(args, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        map_at_k(*args, **kwargs)


def test_other_functions_reject_bad_inputs(tmp_path) -> None:
    q, db, lq, ldb = _toy()
    with pytest.raises(ValueError, match="label rows must match code rows"):
        precision_recall_by_radius(q, db, lq, ldb[:3])
    with pytest.raises(ValueError, match="mismatched nbits"):
        precision_recall_by_radius(q, db[:, :6], lq, ldb)
    with pytest.raises(ValueError, match="larger than the database"):
        hamming_ranking(q, db, 7)
    with pytest.raises(ValueError, match="empty"):
        gmap_l2({})


def test_knn_agreement_is_one_for_codes_that_keep_the_input_neighbours_and_low_for_unrelated_codes():
    from autossvh.metrics import knn_agreement

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32))
    features = np.repeat(centres, 11, axis=0) + 0.05 * rng.normal(size=(88, 32))  # groups of k + 1
    projection = rng.normal(size=(32, 64))
    kept = np.where((features - features.mean(0)) @ projection > 0, 1, -1).astype(np.int8)
    unrelated = np.where(rng.random((88, 64)) < 0.5, 1, -1).astype(np.int8)
    assert knn_agreement(kept, features, k=10) > 0.9  # each video's 10 neighbours: the rest of its group
    assert knn_agreement(unrelated, features, k=10) < 0.2
    with pytest.raises(ValueError, match="need more than k"):
        knn_agreement(kept[:5], features[:5], k=10)


@pytest.mark.parametrize("zeros", [False, True])
def test_leave_one_out_map_ranks_each_video_against_all_the_others(zeros: bool) -> None:
    """Equal to mAP@5 of each video as the only query against the database of all the others (the protocol's
    stable order), averaged; ties with the video itself (identical codes, 0 bits) included."""
    rng = np.random.default_rng(3)
    for n in (6, 7, 19, 40):
        codes = np.where(rng.random((n, 8)) < 0.5, -1, 1).astype(np.int8)
        codes[1:4] = codes[0]  # three later videos tie with video 0 at distance 0
        if zeros:
            codes[rng.random(codes.shape) < 0.15] = 0
        labels = np.eye(4, dtype=bool)[rng.integers(0, 4, n)]
        labels[::5, 3] = True  # some multi-label videos
        one_query = [map_at_k(codes[i:i + 1], np.delete(codes, i, 0), labels[i:i + 1], np.delete(labels, i, 0),
                              ks=(5,))[5] for i in range(n)]
        assert leave_one_out_map(codes, labels, k=5) == pytest.approx(np.mean(one_query), abs=1e-12)


def test_leave_one_out_map_is_one_for_codes_of_the_class_and_needs_more_videos_than_k() -> None:
    classes = np.repeat(np.arange(3), 6)  # 6 videos per class: each has 5 others of its class
    codes = np.where(np.random.default_rng(0).random((3, 16)) < 0.5, -1, 1)[classes]
    labels = np.eye(3, dtype=bool)[classes]
    assert leave_one_out_map(codes, labels, k=5) == 1.0
    assert leave_one_out_map(codes, labels[np.arange(18) % 3 * 6], k=5) < 0.5  # labels unrelated to the codes
    with pytest.raises(ValueError, match="need more than k = 5"):
        leave_one_out_map(codes[:5], labels[:5], k=5)
