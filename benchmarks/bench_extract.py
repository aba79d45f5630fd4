"""Throughput of video feature extraction (``jobs/extract.py``) on this machine's CPUs, by stage.

    .venv/bin/python benchmarks/bench_extract.py                       # 200 videos, vgg16-fc7
    .venv/bin/python benchmarks/bench_extract.py --videos 50 --pipeline-videos 16 --backbone resnet50

Generates ``--videos`` mp4 files (libx264, ``--seconds`` s at ``--fps`` fps, ``--width`` x ``--height``, a keyframe
every ``--gop`` frames; cached under ``--folder``) and measures, T = 25 frames per video:

1. decoding alone: :func:`storage.extraction.decode_one` over every video in this process (one core, seeking to
   the T frames, resize and crop to 224), against decoding every frame of the same files without converting any
   (libswscale's conversion of the T frames to RGB 224 costs more than decoding here);
2. the backbone alone: ``--backbone-frames`` frames of 224 x 224 through the backbone with random weights (the
   same arithmetic as the pretrained ones), with 1 torch thread and with all cores;
3. the whole pipeline: ``jobs/extract.py`` on ``--pipeline-videos`` of the videos through Ray Data (one CPU actor
   with one thread, decoding tasks on the other core), wall time including Ray's start-up.

It prints videos/s and frames/s of each, which stage bounds the pipeline, the load average, and the estimate for
one and eight GPUs from ``--gpu-frames-per-s`` (the backbone's throughput on one GPU: an assumption, not measured
here) and the decoding rate per core measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.backbones import ExtractorSettings, FrameEncoder, encode_frames  # noqa: E402
from storage.extraction import decode_one  # noqa: E402
from storage.video import write_synthetic_video  # noqa: E402

FRAMES = 25


def make_videos(args: argparse.Namespace) -> list[str]:
    folder = Path(args.folder) / f"{args.seconds}s-{args.fps}fps-{args.width}x{args.height}-gop{args.gop}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"video{i:04d}.mp4") for i in range(args.videos)]
    began = time.perf_counter()
    made = 0
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            write_synthetic_video(path + ".part.mp4", args.seconds * args.fps, args.fps, args.width, args.height,
                                  seed=i, gop=args.gop)
            os.replace(path + ".part.mp4", path)
            made += 1
    if made:
        print(f"generated {made} videos in {time.perf_counter() - began:.0f} s under {folder}")
    return paths


def bench_decode(paths: list[str], settings: ExtractorSettings) -> dict[str, float]:
    import av

    began = time.perf_counter()
    for path in paths:
        decode_one(path, settings)
    seeking = time.perf_counter() - began
    sample = paths[: max(1, len(paths) // 10)]
    began = time.perf_counter()
    for path in sample:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for _ in container.decode(stream):
                pass
    every = (time.perf_counter() - began) / len(sample) * len(paths)
    return {"videos_per_s": len(paths) / seeking, "frames_per_s": len(paths) * FRAMES / seeking,
            "every_frame_videos_per_s": len(paths) / every}


def bench_backbone(settings: ExtractorSettings, frames: int, threads: int) -> float:
    torch.set_num_threads(threads)
    encoder = FrameEncoder(settings)
    batch = np.random.default_rng(0).integers(0, 256, (frames, settings.crop, settings.crop, 3), dtype=np.uint8)
    encode_frames(encoder, batch[:2], torch.device("cpu"), 2)  # warm-up
    began = time.perf_counter()
    encode_frames(encoder, batch, torch.device("cpu"), 32)
    return frames / (time.perf_counter() - began)


def bench_pipeline(paths: list[str], backbone: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for path in paths:
            os.symlink(Path(path).resolve(), folder / Path(path).name)
        began = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "extract.py"), "--videos", str(folder), "--out", f"{tmp}/store",
             "--backbone", backbone, "--random-weights", "--workers", "1", "--cpus-per-worker", "1",
             "--num-cpus", "2", "--batch-size", "4", "--summary-json", f"{tmp}/summary.json"],
            capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - began
        if proc.returncode != 0:
            raise SystemExit(f"the pipeline failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(f"{tmp}/summary.json").read_text())
    inside = summary["seconds"]
    return {"wall_s": wall, "run_s": inside, "videos_per_s": len(paths) / inside,
            "frames_per_s": len(paths) * FRAMES / inside}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--pipeline-videos", type=int, default=200, help="videos through the whole pipeline")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--gop", type=int, default=30, help="frames between keyframes of the generated videos")
    parser.add_argument("--backbone", default="vgg16-fc7")
    parser.add_argument("--backbone-frames", type=int, default=64)
    parser.add_argument("--gpu-frames-per-s", type=float, default=1000.0,
                        help="assumed backbone throughput of one GPU (vgg16-fc7 fp32, 224 x 224, batch 200)")
    parser.add_argument("--folder", default="runs/bench/videos")
    args = parser.parse_args()
    paths = make_videos(args)
    settings = ExtractorSettings(args.backbone, FRAMES, random_seed=0)
    cores = os.cpu_count() or 1
    decode = bench_decode(paths, settings)
    print(f"decoding alone (1 core, seek to {FRAMES} frames, scale + crop 224): {decode['videos_per_s']:.1f} videos/s, "
          f"{decode['frames_per_s']:.0f} frames/s; decoding every frame without scaling any: "
          f"{decode['every_frame_videos_per_s']:.1f} videos/s")
    one = bench_backbone(settings, args.backbone_frames, 1)
    every = bench_backbone(settings, args.backbone_frames, cores)
    print(f"backbone alone ({args.backbone}, random weights, 224 x 224): {one:.1f} frames/s ({one / FRAMES:.2f} "
          f"videos/s) with 1 thread, {every:.1f} frames/s ({every / FRAMES:.2f} videos/s) with {cores} threads")
    pipeline = bench_pipeline(paths[: args.pipeline_videos], args.backbone)
    print(f"whole pipeline ({min(args.pipeline_videos, len(paths))} videos, Ray Data, 1 CPU actor with 1 thread + "
          f"decoding tasks): {pipeline['videos_per_s']:.2f} videos/s, {pipeline['frames_per_s']:.1f} frames/s "
          f"({pipeline['run_s']:.0f} s in the job, {pipeline['wall_s']:.0f} s with Python and Ray start-up)")
    bound = "the backbone" if one < decode["frames_per_s"] else "decoding"
    print(f"bounded by {bound}: the backbone takes {1 / one * 1000:.1f} ms per frame on one core, decoding "
          f"{1 / decode['frames_per_s'] * 1000:.2f} ms")
    gpu = args.gpu_frames_per_s
    cores_to_feed = gpu / decode["frames_per_s"]
    print(f"estimate, one GPU at an assumed {gpu:.0f} frames/s: {gpu / FRAMES:.0f} videos/s if "
          f"{cores_to_feed:.1f} cores decode (the cores measured here); 8 GPUs on 8 nodes: "
          f"{8 * gpu / FRAMES:.0f} videos/s with {cores_to_feed:.1f} decoding cores per node")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
