"""Frames sampled from a video at a set interval, with their timestamps (PyAV, FFmpeg inside).

Every frame is decoded (so the samples fall where asked, not only on key frames), and the
first frame at or after each multiple of the interval is kept, turned upright by the
stream's display matrix (phones record sideways and say so there). A file that stops
decoding part way keeps the frames sampled so far and says where it broke.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import av
import av.error
import numpy as np

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.image_decode import MAX_IMAGE_PIXELS
from edgeid.runtime.inference.types import RGBImage

logger = logging.getLogger(__name__)

DEFAULT_FRAME_INTERVAL_S = 1.0  # one frame a second: a face on screen for a second is seen
MIN_FRAME_INTERVAL_S = 0.04  # 25 fps: sampling faster than the frames exist repeats them
# At most this many frames are sampled from one video (an hour at the default interval);
# the rest is reported, not silently dropped.
MAX_SAMPLES_PER_VIDEO = 3600
# A video whose last frame comes this long (or one interval) before the length its header
# states is reported as cut short: container lengths are rounded, never seconds off.
LENGTH_SLACK_S = 1.0


class VideoDamaged(BadInputError):
    """The video stopped decoding; ``at_s`` is the last good timestamp (None: no frame)."""

    def __init__(self, message: str, at_s: float | None) -> None:
        super().__init__(message)
        self.at_s = at_s


@dataclass(frozen=True)
class VideoFrame:
    index: int  # the sample's number in this video, from 0
    time_s: float  # presentation time of the frame, seconds from the stream's start
    pixels: RGBImage


@dataclass
class VideoSummary:
    """What sampling saw, filled in while it runs."""

    duration_s: float | None = None
    width: int = 0
    height: int = 0
    samples: int = 0
    truncated: bool = False  # stopped at MAX_SAMPLES_PER_VIDEO


def _upright(pixels: RGBImage, rotation: int) -> RGBImage:
    """Apply the display matrix's rotation (counter-clockwise degrees, as PyAV reports it)."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def _check_complete(
    summary: VideoSummary, last_time: float | None, interval_s: float, rate: float | None
) -> None:
    """FFmpeg stops quietly at the end of a cut-short file: compare with the stated length."""
    if summary.duration_s is None:
        return
    if last_time is None:
        raise VideoDamaged("the video holds no decodable frame", None)
    slack = max(interval_s, LENGTH_SLACK_S) + (1.0 / rate if rate else 0.0)
    if summary.duration_s - last_time > slack:
        raise VideoDamaged(
            f"the video ends after {last_time:.1f} s of the {summary.duration_s:.1f} s its "
            "header states (cut short or damaged)",
            last_time,
        )


def sample_frames(
    stream: IO[bytes],
    interval_s: float = DEFAULT_FRAME_INTERVAL_S,
    *,
    summary: VideoSummary | None = None,
    max_samples: int = MAX_SAMPLES_PER_VIDEO,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Iterator[VideoFrame]:
    """Yield one upright RGB frame per ``interval_s`` seconds of the first video stream."""
    if not interval_s >= MIN_FRAME_INTERVAL_S:
        raise BadInputError(f"the frame interval must be at least {MIN_FRAME_INTERVAL_S} s")
    summary = summary if summary is not None else VideoSummary()
    try:
        container = av.open(stream, mode="r")
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"not a readable video ({type(exc).__name__})") from None
    last_good: float | None = None
    try:
        if not container.streams.video:
            raise BadInputError("the file holds no video stream")
        video = container.streams.video[0]
        video.thread_type = "AUTO"
        width, height = video.codec_context.width, video.codec_context.height
        if width * height > max_pixels:
            raise BadInputError(
                f"{width}x{height} video frames are over the {max_pixels}-pixel limit"
            )
        summary.width, summary.height = width, height
        if container.duration is not None:
            summary.duration_s = container.duration / av.time_base
        rate = float(video.average_rate) if video.average_rate else None
        next_due = 0.0
        decoded = 0
        last_time = None
        for frame in container.decode(video):
            decoded += 1
            if frame.width * frame.height > max_pixels:
                raise BadInputError("a frame is over the pixel limit")
            time_s = frame.time
            if time_s is None:
                time_s = (decoded - 1) / rate if rate else float(decoded - 1)
            last_time = float(time_s)
            if time_s + 1e-6 < next_due:
                continue
            if summary.samples >= max_samples:
                summary.truncated = True
                return
            rgb = np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
            pixels = _upright(rgb, frame.rotation)
            yield VideoFrame(summary.samples, float(time_s), pixels)
            summary.samples += 1
            last_good = float(time_s)
            while next_due <= time_s + 1e-6:
                next_due += interval_s
        _check_complete(summary, last_time, interval_s, rate)
    except av.error.FFmpegError as exc:
        where = "before the first frame" if last_good is None else f"after {last_good:.1f} s"
        raise VideoDamaged(
            f"the video is damaged {where} ({type(exc).__name__})", last_good
        ) from None
    finally:
        container.close()
