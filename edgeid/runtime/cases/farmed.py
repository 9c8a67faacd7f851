"""The ingest's contract with a farm of nodes that analyse images for it (``--cluster``).

The owning box reads, hashes and deduplicates every file as a local ingest does; a new image's
bytes go to the farm under an opaque key, and its faces come back as ``ImageResult``. A video
is sampled on the owning box as locally, and each sampled frame goes to the farm as decoded
pixels (``FrameJob``): the node never sees the video file, its name or the frame's time. The
farm bounds how much is in flight (``submit`` blocks while it is full) and retries a batch a
dead node held; the ingest writes each result into the case as it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from edgeid.runtime.cases.store import NewFace
from edgeid.runtime.inference.types import RGBImage


@dataclass(frozen=True)
class ImageJob:
    """One image of a batch: an opaque key (never a file name) and its bytes."""

    key: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class FrameJob:
    """A video frame sampled on the owning box: an opaque key and its upright RGB pixels
    (analysed as the local ingest analyses a frame: whole, every face)."""

    key: int
    pixels: RGBImage

    @property
    def size(self) -> int:
        return int(self.pixels.nbytes)


Job: TypeAlias = ImageJob | FrameJob


@dataclass(frozen=True)
class ImageResult:
    """An image's (or a frame's) faces, or why an image could not be decoded (the local
    ingest's refusal text)."""

    key: int
    failed: str | None = None
    width: int = 0
    height: int = 0
    faces: list[NewFace] = field(default_factory=list)
    skipped: int = 0  # faces found but not analysed (over max_faces)


class ImageFarm(Protocol):
    def submit(self, job: Job) -> list[ImageResult]:
        """Queue ``job``; the results finished meanwhile (blocks while the farm is full)."""
        ...

    def forget(self) -> None:
        """Drop whatever an earlier (stopped) run left in the farm: a new run starts empty."""
        ...

    def drain(self) -> list[ImageResult]:
        """Every result still outstanding (blocks until the farm is empty)."""
        ...

    def nodes(self) -> list[dict[str, object]]:
        """Per node: id, address, backend, images and frames done, their rate (no names)."""
        ...
