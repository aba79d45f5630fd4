"""Hamming search (exact ties, hashed index), the code store and the search job, on real faiss and Zarr."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from autossvh import search
from autossvh.model import AutoSSVH
from autossvh.search import CANDIDATE_FACTOR, CANDIDATE_MARGIN, MISSING_DISTANCE, HammingIndex, pack_codes
from cluster import tracking
from cluster.search import search_codes
from storage.codes import UnknownVideoError, create_code_store, open_code_store
from storage.store import IncompleteStoreError, StoreError
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def brute_force(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by (distance, index): popcount of XOR, stable sort."""
    distances = np.bitwise_count(queries[:, None, :] ^ database[None, :, :]).sum(axis=2)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def tied_codes(rng: np.random.Generator, n: int, nbytes: int, distinct: int) -> np.ndarray:
    """``n`` codes drawn from ``distinct`` random codes: every distance is shared by many items."""
    return rng.integers(0, 256, (distinct, nbytes), dtype=np.uint8)[rng.integers(0, distinct, n)]


@pytest.mark.parametrize(("nbytes", "n", "distinct"), [(2, 3000, 40), (1, 600, 4), (8, 2000, None)])
@pytest.mark.parametrize("k", [1, 5, 37, 100])
def test_flat_search_is_exact_with_ties_by_ascending_index(nbytes: int, n: int, distinct: int | None, k: int) -> None:
    rng = np.random.default_rng(nbytes * 1000 + k)
    database = (rng.integers(0, 256, (n, nbytes), dtype=np.uint8) if distinct is None
                else tied_codes(rng, n, nbytes, distinct))
    queries = np.vstack([database[:20], rng.integers(0, 256, (20, nbytes), dtype=np.uint8)])
    distances, indices = HammingIndex(database, "flat").search(queries, k)
    expected_distances, expected_indices = brute_force(database, queries, k)
    assert distances.dtype == np.int32 and indices.dtype == np.int64 and distances.shape == (40, k)
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(indices, expected_indices)
    if distinct is not None:  # the ties at the k-th distance overflow faiss's candidates: the scan path ran
        all_distances = np.bitwise_count(queries[:, None, :] ^ database[None]).sum(axis=2)
        at_or_below = (all_distances <= expected_distances[:, -1:]).sum(axis=1)
        assert (at_or_below > CANDIDATE_FACTOR * k + CANDIDATE_MARGIN).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), distinct=st.integers(1, 20), k=st.integers(1, 320),
       nbytes=st.sampled_from([1, 2, 3, 8]))
def test_flat_search_matches_brute_force(seed: int, n: int, distinct: int, k: int, nbytes: int) -> None:
    rng = np.random.default_rng(seed)
    database = tied_codes(rng, n, nbytes, distinct)
    queries = rng.integers(0, 256, (7, nbytes), dtype=np.uint8)
    distances, indices = HammingIndex(database).search(queries, k)
    expected_distances, expected_indices = brute_force(database, queries, min(k, n))
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(indices, expected_indices)


def test_k_beyond_the_database_is_clamped_to_the_whole_database_ranked() -> None:
    database = tied_codes(np.random.default_rng(0), 9, 2, 3)
    distances, indices = HammingIndex(database).search(database[:2], 50)
    assert distances.shape == indices.shape == (2, 9)
    np.testing.assert_array_equal(indices, brute_force(database, database[:2], 9)[1])
    assert HammingIndex(database).search(database[:0], 4)[1].shape == (0, 4)


@pytest.mark.parametrize(("database", "queries", "k", "message"), [
    (np.zeros((4, 2), np.int64), np.zeros((1, 2), np.uint8), 1, "uint8"),
    (np.zeros(8, np.uint8), np.zeros((1, 2), np.uint8), 1, "2-D"),
    (np.zeros((0, 2), np.uint8), np.zeros((1, 2), np.uint8), 1, "no codes"),
    (np.zeros((4, 2), np.uint8), np.zeros((1, 4), np.uint8), 1, "32-bit codes, the index holds 16-bit"),
    (np.zeros((4, 2), np.uint8), np.zeros((1, 2), np.uint8), 0, "k must be an integer >= 1"),
])
def test_bad_search_inputs_are_refused(database: np.ndarray, queries: np.ndarray, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HammingIndex(database).search(queries, k)


def test_unknown_index_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="index kind 'ivf'"):
        HammingIndex(np.zeros((2, 8), np.uint8), "ivf")  # type: ignore[arg-type]


def test_multihash_results_are_sorted_and_find_exact_and_near_matches() -> None:
    rng = np.random.default_rng(3)
    database = rng.integers(0, 256, (5000, 8), dtype=np.uint8)
    database[100:104] = database[7]  # item 7 has four duplicates
    queries = database[[7, 42, 999]].copy()
    queries[2, 0] ^= 0b1011_0000  # three bits from item 999: within the guaranteed radius (4 x 13 bits: 11)
    index = HammingIndex(database, "multihash")
    distances, indices = index.search(queries, 10)
    assert index.kind == "multihash"
    found = indices >= 0
    assert (distances[~found] == MISSING_DISTANCE).all()
    for row in range(len(queries)):  # ascending (distance, index) among the found items, missing slots last
        pairs = list(zip(distances[row][found[row]], indices[row][found[row]], strict=True))
        assert pairs == sorted(pairs) and found[row].tolist() == sorted(found[row], reverse=True)
    assert indices[0, :5].tolist() == [7, 100, 101, 102, 103] and (distances[0, :5] == 0).all()
    assert indices[1, 0] == 42 and distances[1, 0] == 0
    assert indices[2, 0] == 999 and distances[2, 0] == 3
    all_distances = np.bitwise_count(queries[:, None, :] ^ database[None]).sum(axis=2)
    exact = np.take_along_axis(all_distances, indices.clip(0), axis=1)
    np.testing.assert_array_equal(distances[found], exact[found])  # exact distances for what it returns


def test_multihash_params_follow_the_database_size() -> None:
    assert search.multihash_params(64, 1_000_000) == (3, 20)
    assert search.multihash_params(64, 5000) == (4, 13)
    assert search.multihash_params(64, 10**9) == (3, 21)  # at least three tables
    assert search.multihash_params(16, 10**6) == (3, 5)


def test_auto_picks_the_hashing_index_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    database = np.random.default_rng(0).integers(0, 256, (50, 4), dtype=np.uint8)
    assert HammingIndex(database).kind == "flat"
    monkeypatch.setattr(search, "FLAT_MAX_CODES", 49)
    assert HammingIndex(database).kind == "multihash"


def test_pack_codes_sets_a_bit_where_the_code_is_positive() -> None:
    codes = np.array([[1, -1, 0, 1, -1, -1, -1, 1, *([1] * 8)]], dtype=np.int8)
    np.testing.assert_array_equal(pack_codes(codes), [[0b1001_0001, 0xFF]])
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.ones((2, 12), np.int8))
    with pytest.raises(ValueError, match="only -1, 0 and"):
        pack_codes(np.full((2, 8), 2, np.int8))


def _url(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "codes") if kind == "local" else f"memory://codes-{uuid.uuid4().hex}"


def _write_store(url: str, n: int = 10, with_labels: bool = True, complete: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (n, 2), dtype=np.uint8)
    ids = np.array([f"vid{i:03d}" for i in range(n)])
    labels = (rng.random((n, 5)) < 0.4).astype(np.uint8) if with_labels else None
    writer = create_code_store(url, 16, n, dataset="fcvid", split="database", source="runs/stores/fcvid",
                               model="models:/m@candidate", num_classes=5 if with_labels else None, chunk_rows=4)
    for rows in writer.row_ranges(2):
        part = slice(rows.start, rows.stop)
        writer.write(rows.start, codes[part], ids[part], None if labels is None else labels[part])
    if complete:
        writer.mark_complete()
    return codes, ids, labels


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_code_store_round_trip(kind: str, tmp_path: Path) -> None:
    url = _url(kind, tmp_path)
    codes, ids, labels = _write_store(url)
    store = open_code_store(url)
    np.testing.assert_array_equal(store.codes, codes)
    assert store.video_ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(store.labels, labels)
    assert (store.info.nbits, store.info.count, store.info.dataset, store.info.split, store.info.source,
            store.info.model, store.info.complete) == (16, 10, "fcvid", "database", "runs/stores/fcvid",
                                                        "models:/m@candidate", True)
    assert store.index_of("vid007") == 7
    with pytest.raises(UnknownVideoError, match=f"video id 'nope' is not in the code store {url}"):
        store.index_of("nope")


def test_store_without_labels_and_a_pickled_writer(tmp_path: Path) -> None:
    url = str(tmp_path / "codes")
    codes = np.arange(18, dtype=np.uint8).reshape(9, 2)
    writer = create_code_store(url, 16, 9, dataset="d", split="query", source="", model="", chunk_rows=4)
    assert [(r.start, r.stop) for r in writer.row_ranges(2)] == [(0, 8), (8, 9)]
    assert [(r.start, r.stop) for r in writer.row_ranges(5)] == [(0, 4), (4, 8), (8, 9)]
    for rows in writer.row_ranges(3):  # as Ray workers would: each its own copy of the writer
        copy = pickle.loads(pickle.dumps(writer))
        copy.write(rows.start, codes[rows.start:rows.stop], [f"v{i}" for i in rows])
    store = writer.mark_complete()
    assert store.labels is None and store.info.num_classes is None
    np.testing.assert_array_equal(store.codes, codes)


def test_incomplete_store_is_refused_and_unwritten_rows_block_completion(tmp_path: Path) -> None:
    url = str(tmp_path / "codes")
    _write_store(url, complete=False)
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_code_store(url)
    writer = create_code_store(url, 16, 6, dataset="d", split="s", source="", model="", chunk_rows=4)  # replaces
    writer.write(0, np.zeros((4, 2), np.uint8), ["a", "b", "c", "d"])
    with pytest.raises(StoreError, match=r"2 rows were never written \(the first is row 4\)"):
        writer.mark_complete()
    writer.write(4, np.zeros((2, 2), np.uint8), ["e", "a"])
    with pytest.raises(StoreError, match="video id 'a' is stored 2 times"):
        writer.mark_complete()


def test_complete_store_and_other_data_are_not_overwritten(tmp_path: Path) -> None:
    url = str(tmp_path / "codes")
    _write_store(url)
    with pytest.raises(StoreError, match="complete code store is already there"):
        create_code_store(url, 16, 3, dataset="d", split="s", source="", model="")
    assert len(open_code_store(url)) == 10
    create_code_store(url, 16, 3, dataset="d", split="s", source="", model="", overwrite=True)
    with pytest.raises(IncompleteStoreError):
        open_code_store(url)
    other = str(tmp_path / "other")
    zarr.open_group(other, mode="w", zarr_format=3).attrs["autossvh"] = {"dataset": "fcvid"}
    with pytest.raises(StoreError, match="not a code store is already there"):
        create_code_store(other, 16, 3, dataset="d", split="s", source="", model="")
    with pytest.raises(StoreError, match="a feature store, not a code store"):
        open_code_store(other)
    with pytest.raises(StoreError, match="no code store there"):
        open_code_store(str(tmp_path / "missing"))


def test_bad_writes_are_refused(tmp_path: Path) -> None:
    writer = create_code_store(str(tmp_path / "codes"), 16, 4, dataset="d", split="s", source="", model="",
                               num_classes=3)
    codes, ids, labels = np.zeros((2, 2), np.uint8), ["a", "b"], np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(n, 2\) for 16 bits"):
        writer.write(0, np.zeros((2, 4), np.uint8), ids, labels)
    with pytest.raises(ValueError, match="outside the store's 4 rows"):
        writer.write(3, codes, ids, labels)
    with pytest.raises(ValueError, match="the store has labels"):
        writer.write(0, codes, ids)
    with pytest.raises(ValueError, match="non-empty"):
        writer.write(0, codes, ["a", ""], labels)


def test_search_codes_with_packed_queries(tmp_path: Path) -> None:
    url = str(tmp_path / "codes")
    codes, ids, labels = _write_store(url)
    store = open_code_store(url)
    results = search_codes(store, codes[[3]] ^ np.array([[0, 1]], np.uint8), ["q"], 4)
    expected_distances, expected_rows = brute_force(codes, codes[[3]] ^ np.array([[0, 1]], np.uint8), 4)
    assert [hit.video_id for hit in results[0].hits] == ids[expected_rows[0]].tolist()
    assert [hit.distance for hit in results[0].hits] == expected_distances[0].tolist()
    assert results[0].hits[0].labels == np.flatnonzero(labels[expected_rows[0, 0]]).tolist()


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_a_damaged_code_store_chunk_is_an_error_not_zeros(tmp_path: Path, damage: str) -> None:
    url = str(tmp_path / "codes")
    _write_store(url)  # 10 codes in chunks of 4: codes/c/1/0 holds rows 4:8
    chunk = tmp_path / "codes" / "codes" / "c" / "1" / "0"
    if damage == "deleted":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    proc = run_search_job("--codes", url, "--query", "vid001")
    fragment = "file missing" if damage == "deleted" else "crc32c checksum mismatch"
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def run_search_job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=env)


def test_search_job_prints_the_nearest_videos_and_refuses_unknown_ids(tmp_path: Path) -> None:
    url = str(tmp_path / "codes")
    codes, ids, labels = _write_store(url)
    _, expected_rows = brute_force(codes, codes[[4]], 3)
    proc = run_search_job("--codes", url, "--query", "vid004", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].startswith("query vid004: 3 nearest of 10 16-bit codes")
    assert table[1].split() == ["rank", "video", "id", "distance", "labels"]
    assert [line.split()[1] for line in table[2:5]] == ids[expected_rows[0]].tolist()
    assert table[2].split()[:3] == ["1", "vid004", "0"]
    proc = run_search_job("--codes", url, "--query", "vid004", "--query", "vid009", "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["query"] for r in results] == ["vid004", "vid009"]
    assert results[1]["hits"][0] == {"rank": 1, "video_id": "vid009", "distance": 0,
                                     "labels": np.flatnonzero(labels[9]).tolist()}
    proc = run_search_job("--codes", url, "--query", "vid404", "--top-k", "3")
    assert proc.returncode == 2
    assert f"video id 'vid404' is not in the code store {url}" in proc.stderr and proc.stdout == ""


def test_search_job_refuses_an_incomplete_store(tmp_path: Path) -> None:
    url = str(tmp_path / "codes")
    _write_store(url, complete=False)
    proc = run_search_job("--codes", url, "--query", "vid001")
    assert proc.returncode == 2 and "incomplete" in proc.stderr


class RegisteredCodes(NamedTuple):
    tracking_uri: str
    model_uri: str
    codes_url: str
    codes: np.ndarray


def registered_code_store(tmp_path: Path, model: AutoSSVH, feats: np.ndarray, ids: list[str], dataset: str,
                          source: str, register: str) -> RegisteredCodes:
    """Register ``model`` in an MLflow SQLite store under ``tmp_path`` and write a code store of ``feats`` encoded
    by it, as a user's search setup has them."""
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.start_run(tracking_uri, "search", artifact_location=(tmp_path / "artifacts").as_uri()):
        uri = tracking.log_model(model, step=1, register=register)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    codes = tracking.packed_codes(model, feats)
    url = str(tmp_path / "codes")
    writer = create_code_store(url, model.cfg.model.nbits, len(ids), dataset=dataset, split="database",
                               source=source, model=uri)
    writer.write(0, codes, ids)
    writer.mark_complete()
    return RegisteredCodes(tracking_uri, uri, url, codes)


def test_search_job_encodes_features_with_a_registered_model(tmp_path: Path) -> None:
    cfg = tiny_config()
    model = AutoSSVH(cfg).eval()
    feats = np.random.default_rng(2).standard_normal((12, cfg.data.max_frames, cfg.data.feature_size))
    feats = feats.astype(np.float32)
    tracking_uri, uri, url, codes = registered_code_store(tmp_path, model, feats, [f"clip{i}" for i in range(12)],
                                                          "ucf101", "", "autossvh-search-test")
    np.save(tmp_path / "query.npy", feats[5])
    proc = run_search_job("--codes", url, "--features", str(tmp_path / "query.npy"), "--model", uri,
                          "--mlflow-uri", tracking_uri, "--top-k", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    expected_distances, expected_rows = brute_force(codes, codes[[5]], 12)
    assert result["query"] == "query.npy[0]"
    assert [hit["video_id"] for hit in result["hits"]] == [f"clip{i}" for i in expected_rows[0]]
    assert [hit["distance"] for hit in result["hits"]] == expected_distances[0].tolist()
    assert {"video_id": "clip5", "distance": 0} in [{k: h[k] for k in ("video_id", "distance")}
                                                     for h in result["hits"]]
    assert result["hits"][0]["labels"] is None
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "wide.npy", np.ones((2, cfg.data.max_frames, cfg.data.feature_size + 4), np.float32))
    for query, fragment in [("empty.npy", "cannot read it as a .npy array (EOFError"),
                            ("wide.npy", f"videos of {cfg.data.max_frames} frames x {cfg.data.feature_size + 4} "
                                         f"dims, but the model {uri} takes {cfg.data.max_frames} frames x "
                                         f"{cfg.data.feature_size} dims")]:
        proc = run_search_job("--codes", url, "--features", str(tmp_path / query), "--model", uri,
                              "--mlflow-uri", tracking_uri)
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr  # one line, no traceback or dump
        assert "Traceback" not in proc.stderr and len([ln for ln in proc.stderr.splitlines() if "ERROR" in ln]) == 1
