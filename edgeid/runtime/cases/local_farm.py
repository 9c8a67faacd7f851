"""A case ingest's analysis on this box, several photos at once (``inference.ingest_streams``).

The ingest hands each new photo's bytes, or each sampled video frame, to a ``LocalFarm`` as it
hands them to a cluster (``farmed.py``), and ``streams`` threads analyse them over the box's one
loaded pipeline. ONNX Runtime runs one session from several threads at once, and the small
MTCNN nets use a second intra-op thread poorly, so two photos at once keep two cores busier
than one photo on two threads (README "Parallel analysis").

- Results come back in the order their jobs were submitted, so the case is written as the
  one-at-a-time ingest writes it.
- At most ``2 * streams`` jobs, and ``max_inflight_bytes`` of them, wait or run: ``submit``
  blocks for the oldest beyond that.
- A photo over the working size also takes one of ``max_large`` slots: its full-resolution
  pixels cost the most memory, as in the service's admission.
- A failure inside the analysis (not a bad photo: that is a failed file) is raised in the
  ingest's thread by the ``submit`` or ``drain`` that reaches its result.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from edgeid.runtime.cases.analysis import analyse_pixels, analyse_working, failure_reason
from edgeid.runtime.cases.farmed import FrameJob, ImageJob, ImageResult, Job
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.activity import InferenceLimits
from edgeid.runtime.inference.image_decode import declared_pixels, decode_working
from edgeid.runtime.inference.pipeline import FacePipeline

# Jobs waiting or running per stream: one running and one ready, so no stream waits for the
# ingest to read and hash the next file.
JOBS_PER_STREAM = 2
# Photo bytes and frame pixels held by waiting and running jobs at most (a frame of a 1080p
# video is 6 MiB; photos are at most MAX_IMAGE_BYTES each).
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024


def analyse_job(
    pipeline: FacePipeline, job: Job, *, max_working_pixels: int, max_faces: int
) -> ImageResult:
    """A photo's or a frame's faces as the one-at-a-time ingest finds them: the same decode,
    the same limits. A photo that cannot be decoded or analysed is a failed result."""
    if isinstance(job, FrameJob):
        height, width = job.pixels.shape[:2]
        return ImageResult(job.key, None, width, height, analyse_pixels(pipeline, job.pixels))
    try:
        work = decode_working(job.data, name="this image", max_working_pixels=max_working_pixels)
        faces, skipped = analyse_working(pipeline, work, max_faces=max_faces)
    except BadInputError as exc:
        return ImageResult(job.key, failed=failure_reason(exc))
    width, height = work.full_size
    return ImageResult(job.key, None, int(width), int(height), faces, skipped)


class LocalFarm:
    """See the module docstring. ``analyse`` turns one job into its result on any thread;
    ``is_large`` says which jobs take a large slot."""

    def __init__(
        self,
        analyse: Callable[[Job], ImageResult],
        *,
        streams: int,
        max_large: int = 1,
        is_large: Callable[[Job], bool] = lambda job: False,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
    ) -> None:
        if streams < 1 or max_large < 1:
            raise ValueError("a local farm needs at least one stream and one large slot")
        self._analyse = analyse
        self._is_large = is_large
        self._large = threading.BoundedSemaphore(max_large)
        self._depth = JOBS_PER_STREAM * streams
        self._max_bytes = max_inflight_bytes
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="ingest-stream")
        self._pending: deque[tuple[Future[ImageResult], int]] = deque()
        self._bytes = 0

    @classmethod
    def on_this_box(cls, pipeline: FacePipeline, limits: InferenceLimits) -> LocalFarm:
        """Analyses with ``pipeline`` within the box's limits (``[inference]`` in edgeid.toml)."""

        def analyse(job: Job) -> ImageResult:
            return analyse_job(
                pipeline,
                job,
                max_working_pixels=limits.max_working_pixels,
                max_faces=limits.max_faces,
            )

        def is_large(job: Job) -> bool:
            if not isinstance(job, ImageJob):
                return False
            try:
                return declared_pixels(job.data) > limits.max_working_pixels
            except BadInputError:
                return False  # refused by the decode, at no cost

        return cls(
            analyse,
            streams=limits.ingest_streams,
            max_large=limits.max_large_running,
            is_large=is_large,
        )

    def submit(self, job: Job) -> list[ImageResult]:
        """Queue ``job``; the results ready meanwhile, oldest first (blocks while full)."""
        self._pending.append((self._pool.submit(self._run, job), job.size))
        self._bytes += job.size
        done = self._ready()
        while self._pending and (len(self._pending) > self._depth or self._bytes > self._max_bytes):
            done.append(self._oldest())
            done.extend(self._ready())
        return done

    def drain(self) -> list[ImageResult]:
        """Every outstanding result, in submission order (blocks until all are back)."""
        return [self._oldest() for _ in range(len(self._pending))]

    def forget(self) -> None:
        """Drop the jobs not started and wait for the running ones (their results are lost)."""
        pending = [future for future, _ in self._pending]
        self._pending.clear()
        self._bytes = 0
        for future in pending:
            future.cancel()
        wait(pending)

    def nodes(self) -> list[dict[str, object]]:
        return []  # no cluster nodes: the ingest's progress shows none

    def close(self) -> None:
        self.forget()
        self._pool.shutdown(wait=True)

    def _run(self, job: Job) -> ImageResult:
        if not self._is_large(job):
            return self._analyse(job)
        with self._large:
            return self._analyse(job)

    def _ready(self) -> list[ImageResult]:
        done = []
        while self._pending and self._pending[0][0].done():
            done.append(self._oldest())
        return done

    def _oldest(self) -> ImageResult:
        future, size = self._pending.popleft()
        self._bytes -= size
        return future.result()
