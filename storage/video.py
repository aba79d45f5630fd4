"""Decoding T frames of a video file with PyAV, seeking to them instead of decoding every frame.

The frame rule (recorded in every extracted store as :data:`FRAME_RULE`): a video's decodable frames are its
video stream's packets in presentation order, n of them. Frame i of T (i = 0 .. T-1) is source frame
``floor((i + 0.5) * n / T)``: the centre of the i-th of T equal segments of the video, which at a constant frame
rate is the frame shown at time ``(i + 0.5) * duration / T``. A video with n >= T frames gives T distinct frames;
a shorter one (n < T) repeats frames by the same formula, each source frame at least once and in order (n = 5,
T = 8: frames 0 0 1 2 2 3 4 4). Extracted stores keep every video's n in ``source_frames``, so the repeated ones
can be found.

Decoding reads the packet index first (demuxing only: timestamps and keyframe flags, no decoding), then for each
chosen frame seeks to the keyframe before it, unless the decoder is already between that keyframe and the frame,
in which case it decodes on. A 10 s, 30 fps video with keyframes every 12 frames and T = 25 decodes about 25 x 6
frames instead of 300; with one keyframe (libx264's default GOP of 250 frames) it decodes forward once.

Each frame is scaled by libswscale (bilinear) so that its shorter side is ``resize`` pixels (the longer one
``int(resize * long / short)``, as torchvision's ``Resize``), centre-cropped to ``crop`` x ``crop`` and returned
as RGB uint8. A file that cannot be opened, has no video stream or no frames, or whose chosen frames cannot be
decoded raises :class:`VideoError` naming the file; callers list it as failed and never store zeros for it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import IO, Any

import av
import numpy as np

FRAME_RULE = ("frame i of T is source frame floor((i + 0.5) * n / T) of the n decodable frames in presentation "
              "order (centres of T equal segments); videos with n < T repeat frames by the same formula")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv")
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)  # what a bad file raises inside PyAV
DECODE_TIMEOUT_S = 600.0  # per video: a decode that takes longer is a stalled read (the jobs' --decode-timeout)


class VideoError(ValueError):
    """A video that cannot be decoded; the message names the file and the problem."""


@dataclass(frozen=True)
class DecodedVideo:
    """The T chosen frames of one video.

    ``frames``: (T, crop, crop, 3) uint8 RGB; ``source_frames``: n, the video's decodable frames;
    ``indices``: the T source frame indices (repeats when n < T); ``times``: their presentation times in seconds.
    """

    frames: np.ndarray
    source_frames: int
    indices: np.ndarray
    times: np.ndarray


def sample_indices(num_frames: int, frames: int) -> np.ndarray:
    """The source frame indices of :data:`FRAME_RULE`: ``floor((i + 0.5) * num_frames / frames)``, i < frames."""
    if num_frames < 1 or frames < 1:
        raise ValueError(f"need at least one source frame and one sampled frame, got {num_frames} and {frames}")
    return ((2 * np.arange(frames, dtype=np.int64) + 1) * num_frames) // (2 * frames)


def scaled_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``resize`` and the longer ``int(resize * long / short)``."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def decode_video(source: str | IO[bytes], frames: int, resize: int, crop: int, name: str | None = None,
                 threads: int = 1) -> DecodedVideo:
    """Decode the ``frames`` frames of :data:`FRAME_RULE` from ``source`` (a local path or a binary file object),
    each scaled and centre-cropped as the module says. ``name`` is the file as error messages show it;
    ``threads``: decoder threads (1 when many decoding tasks share the cores)."""
    name = name or str(source)
    try:
        container = av.open(source, mode="r")
    except DECODE_ERRORS as err:
        raise VideoError(f"{name}: cannot open it as a video ({_reason(err)})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        try:
            pts, keyframes = _packet_index(container, stream)
        except DECODE_ERRORS as err:
            raise VideoError(f"{name}: cannot read its packets ({_reason(err)})") from None
        if not pts:
            raise VideoError(f"{name}: the video stream holds no frames (an empty or truncated file)")
        indices = sample_indices(len(pts), frames)
        chosen = [pts[i] for i in indices]
        try:
            decoded = _decode_at(container, stream, sorted(set(chosen)), keyframes, resize, crop)
        except DECODE_ERRORS as err:
            raise VideoError(f"{name}: cannot decode its frames ({_reason(err)})") from None
        missing = [p for p in chosen if p not in decoded]
        if missing:
            seconds = float(missing[0] * stream.time_base)
            raise VideoError(f"{name}: {len(set(missing))} of the chosen frames could not be decoded (the first at "
                             f"{seconds:.3f} s; a truncated or damaged file)")
        time_base = float(stream.time_base)
        start = pts[0]
        return DecodedVideo(frames=np.stack([decoded[p] for p in chosen]), source_frames=len(pts),
                            indices=indices, times=np.array([(p - start) * time_base for p in chosen]))


def _packet_index(container: Any, stream: Any) -> tuple[list[int], list[int]]:
    """Presentation timestamps of every packet of ``stream`` (sorted) and those of its keyframes (sorted)."""
    pts: list[int] = []
    keyframes: list[int] = []
    for packet in container.demux(stream):
        stamp = packet.pts if packet.pts is not None else packet.dts
        if packet.size == 0 or stamp is None or packet.is_discard:
            continue
        pts.append(stamp)
        if packet.is_keyframe:
            keyframes.append(stamp)
    return sorted(pts), sorted(keyframes)


def _decode_at(container: Any, stream: Any, targets: list[int], keyframes: list[int], resize: int, crop: int
               ) -> dict[int, np.ndarray]:
    """The frames at the presentation timestamps ``targets`` (ascending), scaled and cropped: for each, seek to
    the keyframe before it unless the decoder is already past that keyframe, then decode up to it."""
    found: dict[int, np.ndarray] = {}
    frames = None
    position = -math.inf
    for target in targets:
        if target in found:
            continue
        before = bisect.bisect_right(keyframes, target) - 1
        keyframe = keyframes[before] if before >= 0 else target
        if frames is None or keyframe > position or position > target:
            container.seek(keyframe, backward=True, any_frame=False, stream=stream)
            frames = container.decode(stream)
        for frame in frames:
            stamp = frame.pts if frame.pts is not None else frame.dts
            if stamp is None:
                continue
            position = stamp
            if stamp >= target:
                found[target] = _scaled_crop(frame, resize, crop)
                break
    return found


def _scaled_crop(frame: Any, resize: int, crop: int) -> np.ndarray:
    width, height = scaled_size(frame.width, frame.height, resize)
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(rgb[top:top + crop, left:left + crop])


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300] if str(err) else type(err).__name__


def write_synthetic_video(path: str, num_frames: int, fps: int = 30, width: int = 64, height: int = 48,
                          seed: int = 0, codec: str = "libx264", gop: int = 12) -> None:
    """Write an mp4 of ``num_frames`` frames (a moving gradient plus noise; every frame differs) for tests and
    benchmarks. ``gop``: frames between keyframes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(num_frames):
            base = (xs * 3 + ys * 2 + i * 7) % 256
            image = np.stack([base, (base + 85) % 256, (255 - base)], axis=-1)
            image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
