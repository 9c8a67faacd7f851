"""Frames sampled from real videos made here from real LFW photos with PyAV's encoder:
timestamps, the display matrix's rotation, cut-short and non-video files."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from edgeid.runtime.cases.video import VideoDamaged, VideoSummary, sample_frames
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.types import RGBImage

FPS = 5


def pick_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: Path,
    frames: Sequence[RGBImage],
    *,
    fps: int = FPS,
    rotation: int = 0,
    container: str | None = None,
) -> Path:
    """Encode ``frames`` (equal even sizes) at ``fps``; ``rotation`` is written to the display
    matrix (counter-clockwise degrees, as a phone records it)."""
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(pick_codec(), rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def lfw_frames(lfw_dir: Path, count: int) -> list[RGBImage]:
    """``count`` different LFW photos, cropped to 248x248 (even sides for yuv420p)."""
    paths = sorted((lfw_dir / "images").glob("*/*.jpg"))[:count]
    return [np.asarray(Image.open(p).convert("RGB"))[:248, :248].copy() for p in paths]


def close_to(a: RGBImage, b: RGBImage) -> bool:
    return a.shape == b.shape and float(np.abs(a.astype(int) - b.astype(int)).mean()) < 12


@pytest.fixture(scope="module")
def photos(lfw_dir: Path) -> list[RGBImage]:
    return lfw_frames(lfw_dir, 6)


def test_one_frame_per_interval_with_its_timestamp(tmp_path: Path, photos: list[RGBImage]) -> None:
    # Second k shows photo k for its FPS frames: a sample at second k must show photo k.
    frames = [photo for photo in photos for _ in range(FPS)]
    path = write_video(tmp_path / "clip.mp4", frames)
    summary = VideoSummary()
    with open(path, "rb") as stream:
        samples = list(sample_frames(stream, 1.0, summary=summary))
    assert [s.index for s in samples] == list(range(len(photos)))
    assert [round(s.time_s, 3) for s in samples] == [float(k) for k in range(len(photos))]
    for sample, photo in zip(samples, photos, strict=True):
        assert close_to(sample.pixels, photo)
    assert (summary.width, summary.height, summary.samples) == (248, 248, len(photos))
    assert summary.duration_s == pytest.approx(len(photos), abs=0.3)


def test_interval_shorter_and_longer(tmp_path: Path, photos: list[RGBImage]) -> None:
    frames = [photo for photo in photos for _ in range(FPS)]
    path = write_video(tmp_path / "clip.mp4", frames)
    with open(path, "rb") as stream:
        every_2s = [s.time_s for s in sample_frames(stream, 2.0)]
    with open(path, "rb") as stream:
        every_frame = [s.time_s for s in sample_frames(stream, 0.2)]
    assert every_2s == pytest.approx([0.0, 2.0, 4.0])
    assert len(every_frame) == len(frames)


def test_display_matrix_rotation_is_applied(tmp_path: Path, photos: list[RGBImage]) -> None:
    """A phone stores the frame sideways and says so; samples come out upright."""
    upright = photos[0][:, :200].copy()  # not square, so a missed rotation changes the shape
    stored = np.ascontiguousarray(np.rot90(upright, k=-1))  # rotated clockwise as recorded
    path = write_video(tmp_path / "phone.mp4", [stored] * FPS, rotation=90)
    with open(path, "rb") as stream:
        (sample,) = list(sample_frames(stream, 1.0))
    assert close_to(sample.pixels, upright)


def test_cut_short_video_keeps_its_first_frames_and_says_where(
    tmp_path: Path, photos: list[RGBImage]
) -> None:
    frames = [photo for photo in photos for _ in range(FPS)]
    whole = write_video(tmp_path / "clip.mkv", frames, container="matroska").read_bytes()
    summary = VideoSummary()
    seen = []
    with pytest.raises(VideoDamaged) as caught:
        for sample in sample_frames(io.BytesIO(whole[: len(whole) // 2]), 1.0, summary=summary):
            seen.append(sample.time_s)
    assert 1 <= len(seen) < len(photos)
    assert caught.value.at_s is not None and caught.value.at_s >= seen[-1]
    assert "cut short or damaged" in str(caught.value)


def test_not_a_video_and_oversized_frames_are_refused(
    tmp_path: Path, photos: list[RGBImage]
) -> None:
    with pytest.raises(BadInputError, match="not a readable video"):
        list(sample_frames(io.BytesIO(b"\x00\x00\x00\x18ftypisom" + bytes(2000)), 1.0))
    path = write_video(tmp_path / "clip.mp4", [photos[0]] * FPS)
    with open(path, "rb") as stream, pytest.raises(BadInputError, match="pixel limit"):
        list(sample_frames(stream, 1.0, max_pixels=100 * 100))
    with open(path, "rb") as stream, pytest.raises(BadInputError, match="interval"):
        list(sample_frames(stream, 0.0))


def test_sample_cap_is_reported(tmp_path: Path, photos: list[RGBImage]) -> None:
    frames = [photo for photo in photos for _ in range(FPS)]
    path = write_video(tmp_path / "clip.mp4", frames)
    summary = VideoSummary()
    with open(path, "rb") as stream:
        samples = list(sample_frames(stream, 1.0, summary=summary, max_samples=2))
    assert len(samples) == 2 and summary.truncated
