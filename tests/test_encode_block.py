"""A Train worker's encoding of its block of a split: read as stored, and kept while the weights are unchanged,
so that an evaluation's database serves the next clustering round (in one process, no Ray)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cluster.worker as worker_module
from autossvh.engine import build_optimizer, encode
from autossvh.model import AutoSSVH
from cluster.worker import TrainWorker, WorkerConfig, weights_digest
from storage.reader import EvalReader
from storage.store import open_store
from tests.conftest import tiny_config


def make_worker(url: str, rank: int, world: int) -> TrainWorker:
    """A worker with what ``_encode_block`` reads; ``__init__`` would ask Ray Train for the rank."""
    worker = TrainWorker.__new__(TrainWorker)
    cfg = tiny_config()
    worker.wc = WorkerConfig(config=cfg.to_dict(), data=url, storage_options={}, actor=None, loader_workers=0,
                             mlflow_uri="", mlflow_run_id="", selection="last")
    worker.cfg, worker.device, worker.rank, worker.world = cfg, torch.device("cpu"), rank, world
    worker.protocol = open_store(url).info.protocol
    worker.encodings = {}
    return worker


def train_step(model: AutoSSVH) -> None:
    """One step of the fused Adam the runs use."""
    optimizer = build_optimizer(model, model.cfg)
    out = model(torch.randn(8, 8, 16))
    (out.codes.square().mean() + out.recon.square().mean()).backward()
    optimizer.step()


def test_weights_digest_follows_the_weights_however_they_change():
    model = AutoSSVH(tiny_config())
    before = weights_digest(model)
    assert weights_digest(copy.deepcopy(model)) == before
    train_step(model)  # fused Adam: parameters change without a version-counter bump
    assert weights_digest(model) != before
    other = AutoSSVH(tiny_config())
    model.load_state_dict(other.state_dict())
    assert weights_digest(model) == weights_digest(other)


def test_evaluation_database_serves_the_next_clustering_round(tiny_store_url: str,
                                                               monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []

    def counted(model: AutoSSVH, batches: torch.utils.data.DataLoader, device: torch.device):
        calls.append(batches.dataset.split)
        assert batches.dataset.out_dtype is None  # read as stored, converted by encode
        return encode(model, batches, device)

    monkeypatch.setattr(worker_module, "encode", counted)
    worker = make_worker(tiny_store_url, rank=1, world=2)
    model = AutoSSVH(worker.cfg)
    database, first = worker._encode_block(model, "database")  # UCF101-like: the database is the train split
    train, again = worker._encode_block(model, "train")
    assert calls == ["database"] and train is database and again == first
    reference = encode(model, EvalReader(tiny_store_url, "train", 16, rank=1, world_size=2))
    np.testing.assert_array_equal(train.codes, reference.codes)
    np.testing.assert_allclose(train.features, reference.features, atol=1e-6)
    assert first == EvalReader(tiny_store_url, "train", rank=1, world_size=2).start

    worker._encode_block(model, "query")
    assert calls == ["database", "query"]
    train_step(model)
    changed, _ = worker._encode_block(model, "train")
    assert calls == ["database", "query", "train"] and changed is not train
    assert not np.array_equal(changed.features, train.features)
