"""Search a code store: the nearest stored videos of a stored video, or of new videos encoded by a model.

``jobs/search.py`` is argument parsing plus :func:`main`. A query is either a stored video's code
(``--query ID``; the video itself comes back at distance 0, as the evaluation protocol counts the self-match)
or the codes that an MLflow model (``--model models:/NAME@ALIAS`` or ``runs:/...``, the pyfunc of
``cluster.tracking.log_model``) computes from a ``.npy`` file of frame features (``--features``) or from video
files (``--video``): these go through the extractor the code store's feature store was written with
(``jobs/extract.py``; its ``sources.extraction``: backbone, weights, frames, preprocessing), in this process, and
are rounded to that store's dtype, so a new mp4 is encoded exactly as the stored videos were.
Ranking and index kinds are :mod:`autossvh.search`'s: ascending Hamming distance, then ascending store row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autossvh.search import INDEX_KINDS, HammingIndex, IndexKind
from storage.codes import CodeStore, open_code_store
from storage.store import not_a_regular_file
from storage.video import DECODE_TIMEOUT_S
from storage.writer import SourceError, run_job, storage_options_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One retrieved video. ``labels`` are its class indices, or None when the store holds no labels."""

    rank: int
    video_id: str
    distance: int
    labels: list[int] | None


@dataclass(frozen=True)
class QueryResult:
    """The hits of one query, named by its video id or by ``FILE[i]`` for features."""

    query: str
    hits: list[Hit]


def search_codes(store: CodeStore, queries: np.ndarray, names: Sequence[str], k: int,
                 kind: IndexKind = "auto") -> list[QueryResult]:
    """The ``k`` nearest stored videos of each packed query code (Q, nbits / 8) uint8, one result per name."""
    if queries.ndim != 2 or queries.shape[1] != store.info.nbytes:
        raise SourceError(f"the queries are {queries.shape[-1] * 8}-bit codes, the code store {store.url} holds "
                          f"{store.info.nbits}-bit codes")
    began = time.perf_counter()
    index = HammingIndex(store.codes, kind)
    distances, rows = index.search(queries, k)
    log.info("searched %d queries against %d codes (%s index) in %.3f s", len(queries), len(index), index.kind,
             time.perf_counter() - began)
    labels = store.labels
    results = []
    for name, query_distances, query_rows in zip(names, distances, rows, strict=True):
        hits = [Hit(rank=rank, video_id=str(store.video_ids[row]), distance=int(distance),
                    labels=None if labels is None else np.flatnonzero(labels[row]).tolist())
                for rank, (distance, row) in enumerate(zip(query_distances, query_rows, strict=True), start=1)
                if row >= 0]
        results.append(QueryResult(name, hits))
    return results


def load_features(path: Path) -> np.ndarray:
    """Frame features from a ``.npy`` file as float32 (N, T, F); one video (T, F) becomes N = 1."""
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty or cut-off file
        raise SourceError(f"--features {path}: cannot read it as a .npy array ({type(err).__name__}: "
                          f"{err or 'the file ends early'})") from None
    if feats.ndim == 2:
        feats = feats[None]
    if feats.ndim != 3 or 0 in feats.shape or not np.issubdtype(feats.dtype, np.floating):
        raise SourceError(f"--features {path}: expected float frame features (T, F) or (N, T, F), got "
                          f"{feats.dtype} of shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise SourceError(f"--features {path}: holds NaN or Inf")
    return feats.astype(np.float32, copy=False)


def video_features(args: argparse.Namespace, store: CodeStore) -> np.ndarray:
    """Features (N, T, F) of the ``--video`` files through the extractor of the feature store the codes came from
    (or ``--extracted-store``), rounded to that store's dtype."""
    from storage.backbones import BackboneError
    from storage.extraction import extract_videos, extraction_settings
    from storage.video import VideoError

    source = args.extracted_store or store.info.source
    if not source:
        raise SourceError(f"--video: the code store {store.url} does not name its feature store; pass "
                          "--extracted-store URL")
    settings, dtype = extraction_settings(source, storage_options_from(args.storage_options))
    if args.weights:
        settings = dataclasses.replace(settings, weights=args.weights)
    log.info("extracting %d video(s) with %s as %s was extracted", len(args.video), settings.backbone, source)
    try:
        return extract_videos(args.video, settings, dtype, storage_options_from(args.storage_options),
                              timeout=args.decode_timeout)
    except (VideoError, BackboneError) as err:
        raise SourceError(f"--video: {err}") from None


def check_feature_shape(model: Any, feats: np.ndarray, model_uri: str) -> None:
    """Refuse features whose (T, F) differ from the model's input signature, naming both."""
    schema = model.metadata.get_input_schema()
    spec = schema.inputs[0] if schema is not None and schema.inputs else None
    expected = tuple(getattr(spec, "shape", ()) or ())[1:]
    if expected and tuple(feats.shape[1:]) != expected:
        raise SourceError(f"--features: videos of {feats.shape[1]} frames x {feats.shape[2]} dims, but the model "
                          f"{model_uri} takes {expected[0]} frames x {expected[1]} dims")


def model_codes(model_uri: str, feats: np.ndarray, tracking_uri: str) -> np.ndarray:
    """Packed codes (N, nbits / 8) uint8 of features (N, T, F) from the MLflow pyfunc at ``model_uri``."""
    # MLflow (and the model's torch) take seconds to import: only this path needs them.
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from cluster.tracking import TrackingError, check_reachable, redact_url

    try:
        check_reachable(tracking_uri)
    except TrackingError as err:
        raise SourceError(str(err)) from None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        raise SourceError(f"--model {model_uri} (tracking URI {redact_url(tracking_uri)}): {err}") from None
    check_feature_shape(model, feats, model_uri)
    try:
        codes = np.asarray(model.predict(feats))
    except (MlflowException, RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise SourceError(f"--model {model_uri}: cannot encode the features of shape {feats.shape}: "
                          f"{first_line}") from None
    if codes.dtype != np.uint8 or codes.shape[:1] != feats.shape[:1] or codes.ndim != 2:
        raise SourceError(f"--model {model_uri}: expected packed uint8 codes of shape ({len(feats)}, nbits / 8), "
                          f"got {codes.dtype} of shape {codes.shape}")
    return codes


def format_table(results: Sequence[QueryResult], store: CodeStore) -> str:
    """One block per query: a header line, then rank, video id, Hamming distance and (when the store has
    labels) the class indices."""
    with_labels = store.labels is not None
    lines = []
    for result in results:
        lines.append(f"query {result.query}: {len(result.hits)} nearest of {len(store)} {store.info.nbits}-bit "
                     f"codes in {store.url}")
        width = max([len("video id"), *(len(hit.video_id) for hit in result.hits)])
        lines.append(f"{'rank':>5}  {'video id':<{width}}  {'distance':>8}" + ("  labels" if with_labels else ""))
        for hit in result.hits:
            row = f"{hit.rank:>5}  {hit.video_id:<{width}}  {hit.distance:>8}"
            if hit.labels is not None:
                row += "  " + (",".join(map(str, hit.labels)) or "-")
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codes", required=True, help="code store URL: a path, file://, s3://, gs://, memory://")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", action="append", metavar="VIDEO_ID",
                       help="search with this stored video's code (repeatable)")
    query.add_argument("--features", type=Path, metavar="FILE.npy",
                       help="search with the codes --model computes from these frame features, (T, F) or (N, T, F)")
    query.add_argument("--video", action="append", metavar="FILE",
                       help="search with the codes --model computes from this video file (repeatable), through the "
                       "extractor of the feature store the codes came from")
    parser.add_argument("--model", help="MLflow model URI for --features/--video: models:/NAME@ALIAS or "
                        "runs:/RUN/model")
    parser.add_argument("--extracted-store", metavar="URL", help="--video: the extracted feature store whose "
                        "extractor to use (default: the code store's source)")
    parser.add_argument("--weights", metavar="PATH", help="--video: the backbone's state dict, where the store's "
                        "weights file is not at its recorded place")
    parser.add_argument("--decode-timeout", type=float, default=DECODE_TIMEOUT_S, metavar="SECONDS",
                        help="--video: give up on a video whose decoding takes longer (a stalled read)")
    parser.add_argument("--mlflow-uri", default="sqlite:///runs/mlflow.db",
                        help="MLflow tracking URI that holds --model")
    parser.add_argument("--top-k", type=int, default=10, help="results per query (all stored videos at most)")
    parser.add_argument("--index", choices=INDEX_KINDS, default="auto",
                        help="flat: exact; multihash: hashed, approximate; auto: flat up to 1,000,000 codes")
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for --codes, repeatable; VALUE is parsed as JSON "
                        "when it can be")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def check_query_files(args: argparse.Namespace) -> None:
    """Refuse a ``--features`` or ``--video`` that is not a regular file (a FIFO would block forever), by name,
    before any store or model is opened."""
    from storage.extraction import check_video_files
    from storage.video import VideoError

    if args.features is not None:
        problem = not_a_regular_file(args.features)
        if problem:
            raise SourceError(f"--features {args.features}: {problem}")
    try:
        check_video_files(args.video or [], storage_options_from(args.storage_options))
    except VideoError as err:
        raise SourceError(f"--video {err}") from None


def run_search(args: argparse.Namespace) -> list[QueryResult]:
    """Open the store, build the query codes, search and print the results."""
    if args.top_k < 1:
        raise SourceError(f"--top-k must be >= 1, got {args.top_k}")
    encoded = args.features is not None or bool(args.video)
    if encoded != bool(args.model):
        raise SourceError("--features and --video need --model, the MLflow model that encodes them"
                          if args.model is None else "--model applies only to --features and --video (a --query is "
                          "already a stored code)")
    check_query_files(args)
    store = open_code_store(args.codes, storage_options_from(args.storage_options))
    log.info("%s: %d codes of %d bits (dataset %r, split %r, model %r)", store.url, len(store), store.info.nbits,
             store.info.dataset, store.info.split, store.info.model)
    if args.query:
        names = list(args.query)
        queries = store.codes[[store.index_of(video_id) for video_id in names]]
    elif args.video:
        names = list(args.video)
        queries = model_codes(args.model, video_features(args, store), args.mlflow_uri)
    else:
        feats = load_features(args.features)
        names = [f"{args.features.name}[{i}]" for i in range(len(feats))]
        queries = model_codes(args.model, feats, args.mlflow_uri)
    results = search_codes(store, queries, names, args.top_k, args.index)
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=2))
    else:
        print(format_table(results, store), end="")
    return results


def main(args: argparse.Namespace) -> int:
    """The ``jobs/search.py`` job; exit status 2 on bad arguments, an unknown video id or a store error."""
    return run_job(lambda: run_search(args))
