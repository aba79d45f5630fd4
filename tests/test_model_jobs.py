"""The jobs that use a trained model, on a tiny store and a real SQLite MLflow registry: evaluate, encode (then
search the codes) and the promote gate in both directions."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from autossvh.engine import array_batches, encode, evaluate_codes, save_model
from autossvh.model import AutoSSVH
from autossvh.trainer import fit
from cluster import tracking
from cluster.retrieval import ModelRefError, evaluate_on_store, load_model_ref
from storage.codes import open_code_store
from storage.store import open_store
from storage.synthetic_store import write_synthetic
from tests.conftest import ROOT, tiny_config

NAME = "tiny-hashing"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A UCF101-like store, and a registry with a useless model (v1, every weight 0) and a trained one (v2)."""
    tmp = tmp_path_factory.mktemp("models")
    url = str(tmp / "store")
    write_synthetic(url, "ucf101", 160, feature_dim=16, max_frames=8, num_classes=8, seed=3)
    store = open_store(url)
    from autossvh.trainer import RetrievalData

    train, _ = store.load("train")
    query, query_labels = store.load("query")
    cfg = tiny_config("train.num_epochs=6", "cluster.warmup_epoch=3", "train.lr=1e-3")
    trained = fit(cfg, RetrievalData(train, query, query_labels, train, store.load("train")[1])).model.eval()
    useless = AutoSSVH(cfg).eval()
    with torch.no_grad():
        for p in useless.parameters():
            p.zero_()
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracking.start_run(uri, "tests", run_name="models", artifact_location=(tmp / "art").as_uri())
    tracking.log_model(useless, step=1, name="useless", register=NAME)
    tracking.log_model(trained, step=1, name="trained", register=NAME)
    mlflow.end_run()
    save_model(tmp / "trained.pt", trained)
    return {"tmp": tmp, "url": url, "uri": uri, "trained": trained, "cfg": cfg}


def _alias(setup: dict, alias: str, version: str) -> None:
    MlflowClient(setup["uri"]).set_registered_model_alias(NAME, alias, version)


def _reference(model: AutoSSVH, url: str) -> dict[int, float]:
    store = open_store(url)
    (train, train_labels), (query, query_labels) = store.load("train"), store.load("query")
    q = encode(model, array_batches(query, 64)).codes
    db = encode(model, array_batches(train, 64)).codes
    return evaluate_codes(q, query_labels, db, train_labels).map_at_k


def test_registry_and_file_references_load_the_same_model(setup):
    from_registry = load_model_ref(f"models:/{NAME}/2", setup["uri"])
    from_file = load_model_ref(str(setup["tmp"] / "trained.pt"))
    for a, b in zip(from_registry.state_dict().values(), setup["trained"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(),
                                                 setup["trained"].state_dict().values(), strict=True))
    with pytest.raises(ModelRefError, match="no such file or folder"):
        load_model_ref(str(setup["tmp"] / "missing"))
    with pytest.raises(ModelRefError, match="cannot be loaded from MLflow"):
        load_model_ref(f"models:/{NAME}@nope", setup["uri"])


def test_evaluate_job_matches_in_process_protocol_and_writes_pr_curve(setup, tmp_path):
    """A fresh process, as users run it: the registry is found through --mlflow-uri alone."""
    _alias(setup, "candidate", "2")
    job = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", f"models:/{NAME}@candidate",
           "--data", setup["url"], "--workers", "0", "--mlflow-uri", setup["uri"], "--out", str(tmp_path / "eval"),
           "--summary-json", str(tmp_path / "eval.json"), "--batch-size", "48"]
    done = subprocess.run(job, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GMAP(L2)" in done.stdout
    summary = json.loads((tmp_path / "eval.json").read_text())
    expected = _reference(setup["trained"], setup["url"])
    assert [r["model"] for r in summary["results"]] == [f"models:/{NAME}@candidate"]
    assert {int(k): v for k, v in summary["results"][0]["map_at_k"].items()} == pytest.approx(expected, abs=1e-12)
    for figure in ("pr_curve.png", "map_by_k.png"):
        assert (tmp_path / "eval" / figure).stat().st_size > 0


def test_evaluate_with_ray_workers_equals_one_process(ray_session, setup):
    """Two Ray tasks each encode a block; the gathered codes give exactly the in-process mAP."""
    retrieval = evaluate_on_store(setup["trained"], setup["url"], workers=2, batch_size=32)
    assert retrieval.map_at_k == pytest.approx(_reference(setup["trained"], setup["url"]), abs=1e-12)
    assert retrieval.pr_by_radius is not None


def test_evaluate_refuses_a_model_of_other_dimensions(setup, tmp_path):
    other = AutoSSVH(tiny_config("data.feature_size=24"))
    save_model(tmp_path / "other.pt", other)
    with pytest.raises(ModelRefError, match=r"F=24 features, but the store .* holds T=8 x F=16"):
        evaluate_on_store(load_model_ref(str(tmp_path / "other.pt")), setup["url"])


def test_encode_job_writes_a_complete_code_store_that_search_reads(setup, tmp_path):
    out = tmp_path / "codes"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = [sys.executable, str(ROOT / "jobs" / "encode.py"), "--model", str(setup["tmp"] / "trained.pt"),
           "--data", setup["url"], "--split", "database", "--out", str(out), "--workers", "0", "--batch-size", "40"]
    done = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = open_code_store(str(out))
    train, labels = open_store(setup["url"]).load("train")  # UCF101: the database is the train split
    expected = np.packbits(encode(setup["trained"], array_batches(train, 64)).codes > 0, axis=1)
    assert np.array_equal(codes.codes, expected) and np.array_equal(codes.labels, labels)
    first = str(codes.video_ids[0])
    found = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--codes", str(out), "--query", first,
                            "--top-k", "3", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    hits = json.loads(found.stdout)[0]["hits"]
    assert len(hits) == 3 and hits[0]["distance"] == 0


def test_encode_with_ray_tasks_writes_each_rows_range_once(ray_session, setup, tmp_path):
    from cluster.retrieval import encode_to_code_store

    store = encode_to_code_store(setup["trained"], "trained", setup["url"], "query", str(tmp_path / "codes"),
                                 workers=3, batch_size=16, chunk_rows=8)
    query, labels = open_store(setup["url"]).load("query")
    expected = np.packbits(encode(setup["trained"], array_batches(query, 64)).codes > 0, axis=1)
    assert np.array_equal(store.codes, expected) and np.array_equal(store.labels, labels)
    assert list(store.video_ids) == list(open_store(setup["url"]).split("query").video_ids[:])


def test_promote_gate_refuses_a_worse_candidate_and_moves_a_better_one(setup):
    from cluster.registry import promote

    client = MlflowClient(setup["uri"])
    _alias(setup, "champion", "2")
    _alias(setup, "candidate", "1")  # the useless model
    refused = promote(NAME, "candidate", "champion", setup["url"], setup["uri"])
    assert not refused.promoted and refused.candidate_score < refused.champion_score
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    tags = client.get_model_version(NAME, "1").tags
    assert tags["promotion"].startswith("refused") and float(tags["eval.gmap_l2"]) == pytest.approx(
        refused.candidate_score, abs=1e-6)
    assert float(client.get_model_version(NAME, "2").tags["eval.gmap_l2"]) == pytest.approx(
        refused.champion_score, abs=1e-6)
    forced = promote(NAME, "candidate", "champion", setup["url"], setup["uri"], force=True)
    assert forced.promoted and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    _alias(setup, "candidate", "2")
    better = promote(NAME, "candidate", "champion", setup["url"], setup["uri"])
    assert better.promoted and better.candidate_score > better.champion_score
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert client.get_model_version(NAME, "2").tags["promotion"].startswith("promoted")


def test_promote_job_exit_codes(setup):
    from cluster.registry import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    _alias(setup, "champion", "2")
    _alias(setup, "candidate", "1")
    base = [NAME, "--data", setup["url"], "--mlflow-uri", setup["uri"]]
    assert main(parser.parse_args(base)) == 1  # refused
    assert main(parser.parse_args([*base, "--from", "no-such-alias"])) == 2
