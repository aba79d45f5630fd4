"""The per-rank readers: partitions across ranks and epochs, and reading from local disk, memory:// and S3."""

from __future__ import annotations

import itertools
import os
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer

from storage.reader import (
    EvalReader,
    TrainReader,
    _shuffled_batches,
    eval_range,
    make_loader,
    partition,
    videos_per_rank,
)
from storage.store import IncompleteStoreError, StoreInfo, create_store, mark_complete, open_store
from storage.validation import validation_holdout

FRAMES, DIM, CHUNK = 3, 4, 4
TRAIN, DATABASE = 53, 10


def expected_feats(index: np.ndarray) -> np.ndarray:
    """Features that name their video: exact in float16 for these sizes."""
    grid = np.arange(FRAMES * DIM, dtype=np.float32).reshape(FRAMES, DIM) / 16
    return index.astype(np.float32)[:, None, None] + grid


def build_store(url: str, storage_options: dict[str, Any] | None = None, complete: bool = True) -> str:
    info = StoreInfo("fcvid", "query_is_database", FRAMES, DIM, 5, "float16", {"train": TRAIN, "database": DATABASE},
                     CHUNK, 2 * CHUNK)
    group = create_store(url, info, storage_options)
    store = open_store(url, storage_options, require_complete=False, mode="r+")
    for split, n in (("train", TRAIN), ("database", DATABASE)):
        feats = store.split(split).feats
        for start in range(0, n, 3 * CHUNK):
            stop = min(start + 3 * CHUNK, n)
            feats[start:stop] = expected_feats(np.arange(start, stop)).astype(np.float16)
    if complete:
        mark_complete(group)
    return url


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_store(str(tmp_path_factory.mktemp("reader") / "store"))


@pytest.fixture(scope="session")
def s3_options() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 for the session, with a bucket ``reader``."""
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    try:
        s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("reader")
        yield options
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_epoch(reader: TrainReader) -> tuple[list[int], np.ndarray]:
    """Batch sizes and video indices of one epoch, checking each batch's features against its indices."""
    sizes, seen = [], []
    for feats, index in reader:
        assert feats.dtype == torch.float32 and index.dtype == torch.int64
        assert feats.shape == (len(index), FRAMES, DIM)
        np.testing.assert_array_equal(feats.numpy(), expected_feats(index.numpy()))
        sizes.append(len(index))
        seen.append(index.numpy())
    return sizes, np.concatenate(seen)


def check_cover(per_rank: list[np.ndarray], num_videos: int) -> None:
    """Every video exactly once across ranks, plus the pad: the first repeated videos of the sequence."""
    world = len(per_rank)
    assert {len(p) for p in per_rank} == {videos_per_rank(num_videos, world)}
    counts = np.bincount(np.concatenate(per_rank), minlength=num_videos)
    pad = world * videos_per_rank(num_videos, world) - num_videos
    assert counts.min() >= 1 and len(counts) == num_videos
    assert counts.sum() - num_videos == pad < world


@pytest.mark.parametrize("num_videos,chunk", [(1, 4), (3, 4), (16, 4), (53, 4), (97, 8), (64, 64)])
def test_partition_covers_every_video_once_per_epoch(num_videos: int, chunk: int) -> None:
    for world, epoch in itertools.product(range(1, 5), range(3)):
        parts = [partition(num_videos, chunk, r, world, epoch, seed=7) for r in range(world)]
        check_cover([p.indices() for p in parts], num_videos)
        sequence = np.concatenate([p.indices() for p in parts])
        first = sequence[:num_videos]
        np.testing.assert_array_equal(np.sort(first), np.arange(num_videos))
        pad = len(sequence) - num_videos
        np.testing.assert_array_equal(sequence[num_videos:], np.resize(first, pad))
        for p in parts:
            lo, hi = p.segments[:, 0], p.segments[:, 1]
            assert np.all(lo // chunk == (hi - 1) // chunk), "a segment crosses a chunk boundary"
            whole = (lo % chunk == 0) & ((hi % chunk == 0) | (hi == num_videos))
            assert (~whole).sum() <= 2 + 2 * (pad > 0), "reads are not chunk-aligned"
        again = partition(num_videos, chunk, world - 1, world, epoch, seed=7)
        np.testing.assert_array_equal(again.segments, parts[-1].segments)


def test_partition_reshuffles_chunks_each_epoch() -> None:
    orders = [partition(400, 4, 0, 1, epoch, seed=0).segments[:, 0] for epoch in range(3)]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(orders[0], partition(400, 4, 0, 1, 0, seed=1).segments[:, 0])


def test_partition_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        partition(10, 4, 2, 2, 0, 0)


def test_shuffle_buffer_draws_across_chunks_and_fills_batches() -> None:
    chunks = ((np.arange(c * 4, c * 4 + 4), np.zeros((4, 1, 1), np.float16)) for c in range(25))
    buffer = np.empty((3 * 4 + 8, 1, 1), np.float16)
    batches = list(_shuffled_batches(chunks, buffer, 8, np.random.default_rng(0)))
    assert [len(i) for _, i in batches] == [8] * 12 + [4]
    np.testing.assert_array_equal(np.sort(np.concatenate([i.numpy() for _, i in batches])), np.arange(100))
    assert len(np.unique(batches[0][1].numpy() // 4)) > 2


@pytest.mark.parametrize("drop_last", [False, True])
def test_train_reader_on_disk_every_video_once(disk_store: str, drop_last: bool) -> None:
    batch = 5
    for world in range(1, 5):
        orders = []
        for epoch in range(2):
            per_rank = []
            for rank in range(world):
                reader = TrainReader(disk_store, batch_size=batch, rank=rank, world_size=world, seed=3,
                                     shuffle_buffer=2, readahead=2, drop_last=drop_last)
                reader.set_epoch(epoch)
                sizes, seen = read_epoch(reader)
                assert len(sizes) == len(reader)
                if drop_last:
                    assert set(sizes) == {batch}
                else:
                    assert sizes[:-1] == [batch] * (len(sizes) - 1)
                    per_rank.append(seen)
                assert len(np.unique(seen)) == len(seen)
                orders.append(seen)
            if not drop_last:
                check_cover(per_rank, TRAIN)
        assert not np.array_equal(orders[0], orders[world])


@pytest.mark.parametrize("count", [1, 6, 13])
def test_held_out_videos_are_never_read_by_any_rank(disk_store: str, count: int) -> None:
    """``--val-videos``: every rank leaves the same rows out; the features a batch holds name their rows, so no
    held-out video reaches a batch; the training videos are covered once per epoch (plus the pad) and numbered by
    training index; each chunk with training videos is still read in one piece."""
    holdout = validation_holdout(TRAIN, CHUNK, count)
    assert len(holdout.rows) == count and holdout.num_training == TRAIN - count
    np.testing.assert_array_equal(validation_holdout(TRAIN, CHUNK, count).rows, holdout.rows)  # on every rank
    training_rows = np.setdiff1d(np.arange(TRAIN), holdout.rows)
    for world, epoch in itertools.product(range(1, 4), range(2)):
        per_rank = []
        for rank in range(world):
            reader = TrainReader(disk_store, batch_size=5, rank=rank, world_size=world, seed=3, shuffle_buffer=2,
                                 holdout=holdout)
            reader.set_epoch(epoch)
            assert not np.isin(reader.partition().indices(), holdout.rows).any()
            read = []
            for feats, index in reader:
                rows = feats[:, 0, 0].numpy().astype(np.int64)  # expected_feats: the row, exactly
                np.testing.assert_array_equal(rows, training_rows[index.numpy()])
                read.append(rows)
            rows = np.concatenate(read)
            assert not np.isin(rows, holdout.rows).any()
            per_rank.append(holdout.training_index(rows))
        check_cover(per_rank, TRAIN - count)
        if world == 1:
            assert len(reader.partition().segments) == len(np.unique(training_rows // CHUNK))


def test_train_reader_is_deterministic_and_picklable(disk_store: str) -> None:
    reader = TrainReader(disk_store, batch_size=8, seed=1)
    first = read_epoch(reader)[1]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._feats is None
    np.testing.assert_array_equal(read_epoch(clone)[1], first)
    assert reader.memory_bytes() >= reader.buffer_videos * reader.video_bytes


def test_loader_with_forkserver_workers(disk_store: str) -> None:
    """Two workers per rank: the rank still gets its partition once, in len(reader) batches, per epoch."""
    world = 2
    reader = TrainReader(disk_store, batch_size=4, rank=1, world_size=world, seed=5, shuffle_buffer=1)
    loader = make_loader(reader, num_workers=2)
    assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    orders = []
    for epoch in range(2):
        reader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(reader) == len(loader)
        seen = np.concatenate([i.numpy() for _, i in batches])
        for feats, index in batches:
            np.testing.assert_array_equal(feats.numpy(), expected_feats(index.numpy()))
        np.testing.assert_array_equal(np.sort(seen), np.sort(reader.partition().indices()))
        orders.append(seen)
    assert not np.array_equal(np.sort(orders[0]), np.sort(orders[1]))


def test_eval_reader_in_order(disk_store: str) -> None:
    for world in range(1, 5):
        blocks = []
        for rank in range(world):
            reader = EvalReader(disk_store, "query", batch_size=3, rank=rank, world_size=world)
            batches = list(reader)
            assert len(batches) == len(reader)
            start, stop = eval_range(DATABASE, rank, world)
            index = np.concatenate([i.numpy() for _, i in batches]) if batches else np.zeros(0, np.int64)
            np.testing.assert_array_equal(index, np.arange(start, stop))
            blocks.append(index)
            for feats, idx in batches:
                np.testing.assert_array_equal(feats.numpy(), expected_feats(idx.numpy()))
        np.testing.assert_array_equal(np.concatenate(blocks), np.arange(DATABASE))


def test_reader_on_memory_filesystem() -> None:
    url = build_store(f"memory://reader-{uuid.uuid4().hex}")
    per_rank = []
    for rank in range(3):
        reader = TrainReader(url, batch_size=6, rank=rank, world_size=3, shuffle_buffer=2)
        reader.set_epoch(4)
        per_rank.append(read_epoch(reader)[1])
    check_cover(per_rank, TRAIN)
    index = np.concatenate([i.numpy() for _, i in make_loader(EvalReader(url, "train", batch_size=7))])
    np.testing.assert_array_equal(index, np.arange(TRAIN))


def test_reader_refuses_incomplete_store(tmp_path: Any) -> None:
    url = build_store(str(tmp_path / "partial"), complete=False)
    with pytest.raises(IncompleteStoreError):
        TrainReader(url)


def test_reader_on_s3(s3_options: dict[str, Any]) -> None:
    url = build_store(f"s3://reader/{uuid.uuid4().hex}", s3_options)
    per_rank = []
    for rank in range(2):
        reader = TrainReader(url, batch_size=8, rank=rank, world_size=2, storage_options=s3_options)
        reader.set_epoch(1)
        per_rank.append(read_epoch(reader)[1])
    check_cover(per_rank, TRAIN)
    batches = list(make_loader(EvalReader(url, "database", batch_size=3, storage_options=s3_options), num_workers=2))
    np.testing.assert_array_equal(np.concatenate([i.numpy() for _, i in batches]), np.arange(DATABASE))
    for feats, index in batches:
        np.testing.assert_array_equal(feats.numpy(), expected_feats(index.numpy()))


def test_eval_reader_yields_stored_float16_on_request(disk_store: str) -> None:
    as_float32 = EvalReader(disk_store, "train", batch_size=8, rank=1, world_size=2)
    as_stored = EvalReader(disk_store, "train", batch_size=8, rank=1, world_size=2, dtype=None)
    assert as_stored.batch_bytes * 2 == as_float32.batch_bytes
    for (a, ia), (b, ib) in zip(as_float32, make_loader(as_stored), strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.float16
        np.testing.assert_array_equal(ia.numpy(), ib.numpy())
        np.testing.assert_array_equal(b.float().numpy(), a.numpy())
        np.testing.assert_array_equal(b.numpy(), expected_feats(ib.numpy()))
