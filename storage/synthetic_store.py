"""Write a synthetic dataset (``storage.synthetic``) as a feature store, streamed block by block.

The store has the schema of the real dataset it imitates (protocol, frames, splits), labelled query and
database splits (and a labelled train split), each with the generator's true per-frame class signal
(``frame_signal``, which sampler diagnostics read), and ``sources`` records the generator parameters, so the
store can be regenerated. Writing, resume and progress are :mod:`storage.writer`'s, shared with ingest.
"""

from __future__ import annotations

import argparse
from typing import Any

from storage.store import FeatureStore
from storage.synthetic import SHAPES, SyntheticGenerator
from storage.writer import (
    Block,
    SourceError,
    SplitSource,
    add_store_arguments,
    run_job,
    storage_options_from,
    store_info,
    write_store,
)


def write_synthetic(
    url: str,
    like: str,
    videos: int,
    feature_dim: int | None = None,
    max_frames: int | None = None,
    num_classes: int | None = None,
    multilabel_fraction: float = 0.0,
    seed: int = 0,
    informative_share: float | None = None,
    distractor_share: float = 0.0,
    *,
    storage_options: dict[str, Any] | None = None,
    dtype: str = "float16",
    block_videos: int | None = None,
    chunk_videos: int | None = None,
    shard_videos: int | None = None,
    overwrite: bool = False,
) -> FeatureStore:
    """Generate a dataset shaped like ``like`` with ``videos`` train videos into the store at ``url``.

    The arguments up to ``seed`` are :class:`~storage.synthetic.SyntheticGenerator`'s; the stored features equal
    ``make_synthetic(...)``'s rounded to ``dtype``. Re-running the same call resumes an interrupted write.
    """
    try:
        gen = SyntheticGenerator(like, videos, feature_dim=feature_dim, max_frames=max_frames,
                                 num_classes=num_classes, multilabel_fraction=multilabel_fraction, seed=seed,
                                 informative_share=informative_share, distractor_share=distractor_share)
    except ValueError as err:
        raise SourceError(f"synthetic {like}: {err}") from err
    shape = gen.shape
    info = store_info(like, shape.protocol, shape.max_frames, shape.feature_dim, shape.num_classes, dtype,
                      dict(gen.split_sizes), chunk_videos=chunk_videos, shard_videos=shard_videos)
    generator = {"like": like, "videos": videos, "feature_dim": shape.feature_dim, "max_frames": shape.max_frames,
                 "num_classes": shape.num_classes, "multilabel_fraction": gen.multilabel_fraction, "seed": gen.seed}
    if informative_share is not None:  # only when set, so stores written before the knob keep their fingerprint
        generator |= {"informative_share": gen.informative_share, "distractor_share": gen.distractor_share}
    sources = {"kind": "synthetic", "dataset": like, "generator": generator,
               "labelled": {name: True for name in gen.split_sizes}, "train_labelled": True}
    splits = [_split_source(gen, name, n) for name, n in gen.split_sizes.items()]
    return write_store(url, info, splits, {"generator": generator}, sources, storage_options=storage_options,
                       block_videos=block_videos, overwrite=overwrite, frame_signal=True)


def _split_source(gen: SyntheticGenerator, name: str, videos: int) -> SplitSource:
    def read(start: int, stop: int) -> Block:
        # Random access with the same results as iter_blocks (the generator is block-size independent), so
        # a resumed write does not generate the blocks it skips.
        split = gen.generate(name, start, stop)
        return Block(split.feats, split.labels, split.video_ids, split.frame_signal)

    return SplitSource(name, videos, f"synthetic {gen.like} {name}", read)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--like", required=True, choices=sorted(SHAPES), help="real dataset to imitate")
    parser.add_argument("--videos", type=int, required=True, help="train videos (other splits keep the real ratio)")
    parser.add_argument("--feature-dim", type=int, help="per-frame feature size (default: the real one)")
    parser.add_argument("--frames", type=int, help="frames per video (default: the real dataset's)")
    parser.add_argument("--classes", type=int, help="classes (default: the real count, capped by --videos)")
    parser.add_argument("--multilabel-fraction", type=float, default=0.0, help="share of videos with two labels")
    parser.add_argument("--informative-share", type=float,
                        help="share of each video's frames that show its class, as one contiguous run (default: "
                        "soft frame roles that drift over time)")
    parser.add_argument("--distractor-share", type=float, default=0.0,
                        help="with --informative-share: share of frames that show a random other class each")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator: the same seed, the same data")
    add_store_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """The ``jobs/make_synthetic.py`` job; exit status 2 on bad arguments or a store error."""
    return run_job(lambda: write_synthetic(
        args.out, args.like, args.videos, feature_dim=args.feature_dim, max_frames=args.frames,
        num_classes=args.classes, multilabel_fraction=args.multilabel_fraction, seed=args.seed,
        informative_share=args.informative_share, distractor_share=args.distractor_share,
        storage_options=storage_options_from(args.storage_options), dtype=args.dtype,
        block_videos=args.block_videos, chunk_videos=args.chunk_videos, shard_videos=args.shard_videos,
        overwrite=args.overwrite))
