"""The ``jobs/extract.py`` job: video files → frame features → a feature store, on Ray Data.

The pipeline (one Ray Data dataset, streamed)::

    list files (driver)  →  decode: map_batches over CPU tasks, DECODE_BATCH videos per call
                         →  features: map_batches on an actor pool (--workers actors, --gpus-per-worker each)
                         →  the driver writes whole shards as results arrive (storage.extraction.SplitWriter)

Decoding tasks (PyAV, seeking to the T frames, :mod:`storage.video`) run on every free CPU of the cluster while the
actors compute features, so decoding and inference overlap; each actor call takes ``--batch-size`` videos
(``batch_size * T`` frames in one forward pass), so a GPU never waits for one video at a time. Results keep the
listing order (Ray Data's ``preserve_order``), which makes the store's row order reproducible at the cost of
holding finished videos behind a slow one. A video that fails to decode is passed through as failed and is never
given to the model; the driver lists it in the store's failed record.

Progress: a line every :data:`PROGRESS_SECONDS` with videos/s, frames/s and the ETA; at the end a summary with
the videos written and failed, the time, and throughput per stage (decoding per CPU-second of its tasks, the
backbone per second of its actors, writing). Splits, labels, rows, resume and the failed record are
:mod:`storage.extraction`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.runtime import absolute_path, configure_logging, init_ray
from storage.backbones import BACKBONES, DEFAULT_BACKBONE, ExtractorSettings, resolve_weights
from storage.extraction import LabelFile, SplitWriter, decode_one, glob_root, list_videos
from storage.schema import PROTOCOLS, SPLITS
from storage.store import FEATURE_DTYPES, check_apart
from storage.video import DECODE_TIMEOUT_S, VideoError
from storage.writer import storage_options_from

log = logging.getLogger(__name__)

DECODE_BATCH = 4  # videos per decoding task call: small, so frames reach the actors early
DECODER_MEMORY = 256 << 20  # bytes a decoding task reserves besides its frames (FFmpeg's buffers, a 1080p GOP)
MAX_INPUT_BLOCKS = 2048  # blocks of the listing; a block holds at least DECODE_BATCH videos
PROGRESS_SECONDS = 10.0
CPU_FORWARD_FRAMES = 32  # frames per forward pass on a CPU actor (bounds VGG-16's activations to ~1 GB)


def decode_batch(batch: dict[str, np.ndarray], settings: ExtractorSettings,
                 storage_options: dict[str, Any] | None, timeout: float) -> dict[str, np.ndarray]:
    """Ray Data CPU task: the T frames of each video of ``batch["path"]``; a video that cannot be decoded (or not
    within ``timeout`` seconds) gets ``ok = False``, its error, and zero frames that the model stage skips."""
    paths = [str(p) for p in batch["path"]]
    frames = np.zeros((len(paths), settings.frames, settings.crop, settings.crop, 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    errors = [""] * len(paths)
    counts = np.zeros(len(paths), np.int32)
    seconds = np.zeros(len(paths), np.float64)
    for i, path in enumerate(paths):
        began = time.perf_counter()
        try:
            frames[i], counts[i] = decode_one(path, settings, storage_options, timeout=timeout)
            ok[i] = True
        except VideoError as err:
            errors[i] = str(err)
        seconds[i] = time.perf_counter() - began
    return {"path": np.array(paths), "ok": ok, "error": np.array(errors), "frames": frames,
            "source_frames": counts, "decode_seconds": seconds}


class FeatureModel:
    """Ray Data actor: the backbone of ``settings`` on a GPU (when the actor has one) or on its CPUs; features
    of the decoded videos of a batch, cast to the store's dtype, and the batch without its frames."""

    def __init__(self, settings: ExtractorSettings, dtype: str, threads: int) -> None:
        import torch

        from storage.backbones import FrameEncoder

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.encoder = FrameEncoder(settings).to(self.device)
        self.settings, self.dtype = settings, dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from storage.backbones import encode_frames

        began = time.perf_counter()
        ok = batch["ok"]
        frames = batch["frames"]
        t, dim = self.settings.frames, self.encoder.feature_dim
        features = np.zeros((len(ok), t, dim), self.dtype)
        if ok.any():
            chosen = frames[ok].reshape(-1, *frames.shape[2:])
            step = len(chosen) if self.device.type == "cuda" else CPU_FORWARD_FRAMES
            features[ok] = encode_frames(self.encoder, chosen, self.device, step).reshape(-1, t, dim)
        seconds = (time.perf_counter() - began) / len(ok)
        out = {key: value for key, value in batch.items() if key != "frames"}
        return {**out, "features": features, "model_seconds": np.full(len(ok), seconds)}


@dataclass
class ExtractSummary:
    """What one run did (also ``--summary-json``)."""

    store: str
    split: str
    listed: int
    already: int
    written: int
    failed: list[dict[str, str]]
    seconds: float
    complete: bool
    stages: dict[str, float] = field(default_factory=dict)


class Progress:
    """Videos/s, frames/s and ETA on the console, every :data:`PROGRESS_SECONDS`."""

    def __init__(self, split: str, total: int, frames: int) -> None:
        self.split, self.total, self.frames = split, total, frames
        self.began = self.last = time.perf_counter()
        self.done = self.failed = 0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.began)
            eta = (self.total - self.done) / rate
            log.info("%s: %d/%d videos (%d failed), %.1f videos/s, %.0f frames/s, ETA %dm%02ds", self.split,
                     self.done, self.total, self.failed, rate, rate * self.frames, eta // 60, eta % 60)


def build_dataset(videos: list[str], settings: ExtractorSettings, args: argparse.Namespace,
                  storage_options: dict[str, Any]) -> Any:
    """The Ray Data pipeline over ``videos``: decoding tasks, then the feature actors (module docstring)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = args.verbose
    if not args.verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's own logger, set up on its import
    blocks = max(1, min(math.ceil(len(videos) / DECODE_BATCH), MAX_INPUT_BLOCKS))
    dataset = ray.data.from_items([{"path": v} for v in videos], override_num_blocks=blocks)
    # Decoding tasks reserve the memory of their frames plus a decoder's working set. Besides bounding how many run
    # at once, this keeps them separate tasks: Ray Data fuses a map into the next one when both ask for the same
    # resources (CPU actors), and the backbone would then wait for every decode.
    memory = DECODE_BATCH * settings.frames * settings.crop ** 2 * 3 + DECODER_MEMORY
    dataset = dataset.map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=1,
                                  memory=memory,
                                  fn_kwargs={"settings": settings, "storage_options": storage_options,
                                             "timeout": args.decode_timeout})
    return dataset.map_batches(
        FeatureModel, batch_size=args.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=args.workers),
        num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker or None,
        fn_constructor_kwargs={"settings": settings, "dtype": args.dtype,
                               "threads": math.ceil(args.cpus_per_worker)})


def run_extract(args: argparse.Namespace) -> ExtractSummary:
    """Check the inputs, then extract ``--videos`` into split ``--split`` of ``--out`` (or resume it)."""
    settings = ExtractorSettings(args.backbone, args.frames, args.weights, args.random_weights, args.image_size)
    for name in ("batch_size", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.decode_timeout > 0:
        raise ValueError(f"--decode-timeout must be > 0 seconds, got {args.decode_timeout}")
    out = absolute_path(args.out)
    check_apart({"--out": out, "--summary-json": args.summary_json},
                {"--videos": glob_root(args.videos), "--labels": args.labels, "--weights": args.weights})
    resolve_weights(settings)
    options = storage_options_from(args.storage_options)
    listing = list_videos(args.videos, options)
    labels = LabelFile.read(args.labels) if args.labels else None
    writer = SplitWriter.open(out, args.split, listing, settings, protocol=args.protocol, dataset=args.dataset,
                              dtype=args.dtype, labels=labels, storage_options=options,
                              chunk_videos=args.chunk_videos, shard_videos=args.shard_videos,
                              overwrite=args.overwrite)
    began = time.perf_counter()
    listed = len(listing.ids)
    if writer.split_state.finished:
        log.info("%s: split %r is already extracted (%d videos, %d failed); nothing to do", out, args.split,
                 writer.split_state.rows, len(writer.split_state.failed))
    else:
        if writer.already:
            log.info("%s: resuming split %r: %d of %d videos already written or failed, %d left", out, args.split,
                     writer.already, listed, len(writer.todo))
        log.info("extracting %d videos of split %r with %s (%s), T=%d, on %d worker(s)", len(writer.todo),
                 args.split, settings.backbone, settings.describe()["weights"], settings.frames, args.workers)
    stages = {"decode_seconds": 0.0, "model_seconds": 0.0}
    if writer.todo:
        init_ray(args.workers * math.ceil(args.cpus_per_worker) + 1, args.num_cpus, args.verbose)
        progress = Progress(args.split, len(writer.todo), settings.frames)
        dataset = build_dataset(writer.todo, settings, args, options)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i, video in enumerate(batch["path"]):
                video = str(video)
                stages["decode_seconds"] += float(batch["decode_seconds"][i])
                if batch["ok"][i]:
                    stages["model_seconds"] += float(batch["model_seconds"][i])
                    writer.add(video, batch["features"][i], int(batch["source_frames"][i]))
                else:
                    log.warning("skipped %s", batch["error"][i])
                    writer.fail(video, str(batch["error"][i]))
                progress.update(bool(batch["ok"][i]))
    complete = writer.finish() if not writer.split_state.finished else bool(writer.info.get("complete"))
    seconds = time.perf_counter() - began
    summary = ExtractSummary(out, args.split, listed, writer.already, writer.written, writer.failed_now, seconds,
                             complete, {**stages, "write_seconds": writer.write_seconds,
                                        "write_bytes": writer.bytes_written})
    _log_summary(summary, settings.frames)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _log_summary(summary: ExtractSummary, frames: int) -> None:
    stages = summary.stages
    processed = summary.written + len(summary.failed)
    parts = [f"{summary.split}: wrote {summary.written} videos, {len(summary.failed)} failed, in "
             f"{summary.seconds:.1f} s"]
    if processed:
        parts.append(f"{processed / summary.seconds:.1f} videos/s, {summary.written * frames / summary.seconds:.0f} "
                     "frames/s overall")
    if stages["decode_seconds"] > 0:
        parts.append(f"decoding {processed / stages['decode_seconds']:.1f} videos/s per CPU")
    if stages["model_seconds"] > 0:
        parts.append(f"backbone {summary.written * frames / stages['model_seconds']:.0f} frames/s per worker")
    if stages["write_seconds"] > 0:
        parts.append(f"writing {stages['write_bytes'] / 1e6 / stages['write_seconds']:.0f} MB/s")
    log.info("; ".join(parts))
    for failure in summary.failed:
        log.warning("failed: %s", failure["error"])
    state = "complete" if summary.complete else "incomplete until every split of its protocol is extracted"
    log.info("%s: %s (split %r: %d listed, %d written before this run or failed earlier)", summary.store, state,
             summary.split, summary.listed, summary.already)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", required=True, metavar="URL",
                        help="a folder (searched recursively), a glob or one file; local or any fsspec URL")
    parser.add_argument("--split", choices=SPLITS, default="train", help="the store split these videos become")
    parser.add_argument("--labels", metavar="FILE.csv", help="CSV with columns path,classes (classes separated by "
                        "';'; paths relative to --videos or as listed); the same file for every split")
    parser.add_argument("--out", required=True, help="feature store URL: a path, file://, s3://, gs://")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="database_is_train",
                        help="splits the store holds: database_is_train (train + query), query_is_database "
                        "(train + database), separate (all three)")
    parser.add_argument("--dataset", default="videos", help="the dataset's name in the store")
    parser.add_argument("--backbone", choices=list(BACKBONES), default=DEFAULT_BACKBONE,
                        help="frame feature extractor (vgg16-fc7: the paper's 4,096-d features)")
    parser.add_argument("--frames", type=int, default=25, help="T frames per video, uniformly spaced")
    parser.add_argument("--weights", metavar="PATH", help="backbone state dict (torch.load(weights_only=True)); "
                        "default: torchvision's file from the torch hub cache, downloaded when reachable")
    parser.add_argument("--random-weights", type=int, nargs="?", const=0, metavar="SEED",
                        help="randomly initialised backbone (seed, default 0): for tests and benchmarks only, the "
                        "features mean nothing")
    parser.add_argument("--image-size", type=int, help="frame crop size, with --random-weights only (default: the "
                        "backbone's 224)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per backbone call (x T frames)")
    parser.add_argument("--workers", type=int, default=1, help="backbone actors")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per backbone actor; > 0 on CUDA")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs per backbone actor (its torch threads on CPU)")
    parser.add_argument("--dtype", choices=FEATURE_DTYPES, default="float16", help="stored feature dtype")
    parser.add_argument("--chunk-videos", type=int, help="videos per chunk (default: ~4 MiB chunks)")
    parser.add_argument("--shard-videos", type=int, help="videos per shard, a multiple of --chunk-videos "
                        "(default: 16 chunks); the unit written and resumed")
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for --videos, --out and --labels, repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the store at --out that jobs/extract.py wrote (with all of its splits); "
                        "another kind of store, or anything else, is refused")
    parser.add_argument("--decode-timeout", type=float, default=DECODE_TIMEOUT_S, metavar="SECONDS",
                        help="a video whose decoding takes longer is listed as failed (a stalled read)")
    parser.add_argument("--summary-json", type=Path, help="write the run's summary here")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without RAY_ADDRESS "
                        "(default: the machine's cores)")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own output and Ray Data's "
                        "progress bars")


def main(args: argparse.Namespace) -> int:
    """The ``jobs/extract.py`` job: exit status 2 on bad input (nothing marked complete), 0 when the split is
    extracted (failed videos are listed, not fatal)."""
    configure_logging(args.verbose)
    try:
        run_extract(args)
    except ValueError as err:
        log.error("%s", err)
        return 2
    return 0
