"""The owning box's side of a cluster ingest: Ray actors, one per node with the
``edgeid_node`` resource (nodes `edgeid cluster worker` started), each holding one loaded face
pipeline; batches of image bytes (and of sampled video frames' pixels) go to them through a
bounded in-flight window.

Why actors and a window rather than Ray Data's ``map_batches``: the media are read, hashed and
deduplicated on the owning box (an archive member or a file already in the case must never be
sent), one at a time and in a bounded memory, and each finished image is written into the case
as soon as it returns so that a stopped run resumes where it was. Ray Data wants a dataset it
reads itself (from storage every node can reach, which seized media must not be on) or one
materialised whole in the object store; its retries are per task, out of the caller's sight.
Here the window is explicit: at most ``batches_per_node`` batches per node in flight, and at
most ``max_inflight_bytes`` of images and frames (they wait in the owning box's object store
until a node takes them), plus one batch being filled, so memory is bounded by the batch size
whatever the size of the seizure or the number of nodes.

Faults: a node (or its actor) that dies costs the batches it held; they go back to the front
of the queue and are retried on another node (at most ``retries`` times each). New nodes are
looked for every few seconds and given an actor: a node that joins late takes work.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from edgeid.runtime.cases.farmed import FrameJob, ImageResult, Job
from edgeid.runtime.cluster.node import NODE_RESOURCE, FaceNode, NodeInfo
from edgeid.runtime.cluster.tls import ClusterTls
from edgeid.runtime.errors import EdgeidError

logger = logging.getLogger(__name__)

MAX_BATCH_BYTES = 64 * 1024 * 1024  # a batch is cut at this many bytes of images or pixels
# In flight at most: half the owning box's object store at its default size (launch.py), so
# the store never fills (it must not spill to disk).
MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
REFRESH_S = 3.0  # look for new (or replaced) nodes this often
NODE_START_S = 180.0  # loading a node's models may take this long (a TensorRT engine build)
NODE_RETRY_S = 10.0  # a node whose actor died is given a new one after this long
WAIT_FOR_NODES_S = 120.0  # with work queued and no node left, wait this long for one


class ClusterError(EdgeidError):
    """The cluster cannot finish the work (no node left, a batch failing everywhere)."""


@dataclass
class _Batch:
    jobs: list[Job]
    size: int  # bytes of images or pixels
    attempts: int = 0

    @property
    def frames(self) -> int:
        return sum(1 for job in self.jobs if isinstance(job, FrameJob))


@dataclass
class _Node:
    info: NodeInfo
    actor: Any
    started: float
    inflight: dict[Any, _Batch] = field(default_factory=dict)  # ObjectRef -> batch
    files: int = 0  # images analysed
    frames: int = 0  # video frames analysed
    alive: bool = True
    batches_lost: int = 0


class RayFarm:
    """An ``ImageFarm`` on a Ray cluster; use as a context manager (connects, disconnects)."""

    def __init__(
        self,
        address: str,
        tls: ClusterTls,
        *,
        detector: str,
        model_id: str,
        max_working_pixels: int,
        max_faces: int,
        batch_files: int = 8,
        batches_per_node: int = 2,
        retries: int = 3,
        wait_for_nodes_s: float = WAIT_FOR_NODES_S,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
    ) -> None:
        self.address = address
        self.tls = tls
        self.detector = detector
        self.model_id = model_id
        self.limits = (max_working_pixels, max_faces)
        self.batch_files = batch_files
        self.batches_per_node = batches_per_node
        self.retries = retries
        self.wait_for_nodes_s = wait_for_nodes_s
        self.max_inflight_bytes = max_inflight_bytes
        self._nodes: dict[str, _Node] = {}
        self._gone: dict[str, float] = {}  # node id -> when its actor died (or was refused)
        self._refused: set[str] = set()  # nodes with another model: never given work
        self._queue: deque[_Batch] = deque()
        self._filling: list[Job] = []
        self._filling_bytes = 0
        self._last_refresh = 0.0
        self._ray: Any = None

    # -- connection --------------------------------------------------------------------------

    def __enter__(self) -> RayFarm:
        if "ray" in sys.modules and os.environ.get("RAY_USE_TLS") != "1":
            # Ray's core reads its TLS settings once, when it is imported.
            raise ClusterError("Ray was loaded before its TLS was set up; run the ingest anew")
        self.tls.apply()
        import ray  # the optional extra edgeid[cluster]

        self._ray = ray
        ray.init(
            address=self.address,
            namespace="edgeid-ingest",
            logging_level=logging.WARNING,
            log_to_driver=False,  # a node's log lines stay on the node
            configure_logging=False,
        )
        try:
            self._refresh(force=True)
            if not self._live():
                self._await_nodes()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for node in self._nodes.values():
            if node.alive:
                self._ray.kill(node.actor, no_restart=True)
        self._ray.shutdown()

    # -- the ImageFarm protocol --------------------------------------------------------------

    def submit(self, job: Job) -> list[ImageResult]:
        self._filling.append(job)
        self._filling_bytes += job.size
        if len(self._filling) >= self.batch_files or self._filling_bytes >= MAX_BATCH_BYTES:
            self._cut()
        done = self._collect(timeout=0)
        self._dispatch()
        while self._queue:  # the window is full: back-pressure on the reader
            done += self._collect(timeout=1.0)
            self._dispatch()
        return done

    def forget(self) -> None:
        # A stopped run's batches may still be running: their results are never read (a node
        # runs its batches in order, so the new run's wait behind them at most).
        self._queue.clear()
        self._filling, self._filling_bytes = [], 0
        for node in self._nodes.values():
            node.inflight.clear()

    def drain(self) -> list[ImageResult]:
        self._cut()
        done: list[ImageResult] = []
        self._dispatch()
        while self._queue or self._inflight():
            done += self._collect(timeout=1.0)
            self._dispatch()
        return done

    def nodes(self) -> list[dict[str, object]]:
        now = time.monotonic()
        return [
            {
                "node": node_id[:12],
                "address": n.info.address,
                "backend": n.info.backend,
                "alive": n.alive,
                "head": n.info.head,
                "pid": n.info.pid,
                "in_flight": len(n.inflight),
                "files": n.files,
                "frames": n.frames,
                # images and video frames: each is one picture analysed
                "files_per_s": round((n.files + n.frames) / max(now - n.started, 1e-3), 2),
                "batches_lost": n.batches_lost,
            }
            for node_id, n in self._nodes.items()
        ]

    # -- the window --------------------------------------------------------------------------

    def _cut(self) -> None:
        if self._filling:
            self._queue.append(_Batch(self._filling, self._filling_bytes))
            self._filling, self._filling_bytes = [], 0

    def _live(self) -> list[_Node]:
        return [n for n in self._nodes.values() if n.alive]

    def _inflight(self) -> dict[Any, _Node]:
        return {ref: n for n in self._live() for ref in n.inflight}

    def _dispatch(self) -> None:
        self._refresh()
        if self._queue and not self._live():
            self._await_nodes()
        while self._queue:
            free = [n for n in self._live() if len(n.inflight) < self.batches_per_node]
            if not free:
                return
            held = sum(b.size for n in self._live() for b in n.inflight.values())
            if held and held + self._queue[0].size > self.max_inflight_bytes:
                return  # one batch may always go, however large
            # The least busy; among equals the one that has done least: a node that joined late
            # takes the next batch.
            node = min(free, key=lambda n: (len(n.inflight), n.files + n.frames))
            batch = self._queue.popleft()
            batch.attempts += 1
            node.inflight[node.actor.analyse.remote(batch.jobs)] = batch

    def _collect(self, timeout: float) -> list[ImageResult]:
        inflight = self._inflight()
        if not inflight:
            return []
        ready, _ = self._ray.wait(
            list(inflight), num_returns=1 if timeout else len(inflight), timeout=timeout
        )
        done: list[ImageResult] = []
        for ref in ready:
            node = inflight[ref]
            if ref not in node.inflight:
                continue  # its node was found dead while reading an earlier ref
            batch = node.inflight.pop(ref)
            try:
                results: list[ImageResult] = self._ray.get(ref)
            except self._ray.exceptions.RayTaskError as exc:
                # The analysis itself raised (not a lost node): retried, then the run fails.
                self._requeue(batch, f"a node failed a batch: {type(exc.cause).__name__}")
                continue
            except self._ray.exceptions.RayError as exc:
                self._lost(node, batch, exc)
                continue
            frames = batch.frames
            node.files += len(results) - frames
            node.frames += frames
            done.extend(results)
        return done

    def _requeue(self, batch: _Batch, why: str) -> None:
        if batch.attempts > self.retries:
            raise ClusterError(
                f"{why}; gave up after {batch.attempts} tries; the files not finished are "
                "read by the next run"
            )
        self._queue.appendleft(batch)

    def _lost(self, node: _Node, batch: _Batch, exc: Exception) -> None:
        """A node (or its actor) died: every batch it held goes back to the queue."""
        logger.warning(
            "cluster node %s lost (%s); %d batches retried elsewhere",
            node.info.node_id[:12],
            type(exc).__name__,
            1 + len(node.inflight),
        )
        node.alive = False
        self._gone[node.info.node_id] = time.monotonic()
        with _quiet():
            self._ray.kill(node.actor, no_restart=True)
        for held in [batch, *node.inflight.values()]:
            node.batches_lost += 1
            self._requeue(held, f"a batch was lost with {held.attempts} nodes")
        node.inflight.clear()

    # -- nodes -------------------------------------------------------------------------------

    def _await_nodes(self) -> None:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while not self._live():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"no edgeid cluster node at {self.address} answers; start workers with "
                    "edgeid cluster worker --head ADDRESS (the files not finished are read by "
                    "the next run)"
                )
            time.sleep(1.0)
            self._refresh(force=True)

    def _refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_S:
            return
        self._last_refresh = now
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = self._ray.remote(FaceNode)
        starting: list[tuple[str, Any, Any]] = []
        for entry in self._ray.nodes():
            node_id = str(entry["NodeID"])
            if not entry.get("Alive") or entry.get("Resources", {}).get(NODE_RESOURCE, 0) < 1:
                continue
            known = self._nodes.get(node_id)
            if (known and known.alive) or node_id in self._refused:
                continue
            if now - self._gone.get(node_id, -NODE_RETRY_S) < NODE_RETRY_S:
                continue
            actor = remote.options(
                resources={NODE_RESOURCE: 1},
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self.detector, *self.limits)
            starting.append((node_id, actor, actor.describe.remote()))
        for node_id, actor, ready in starting:
            try:
                info: NodeInfo = self._ray.get(ready, timeout=NODE_START_S)
            except Exception as exc:  # a node that cannot load its models gets no work
                logger.warning("cluster node %s did not start: %s", node_id[:12], exc)
                self._gone[node_id] = time.monotonic()
                with _quiet():
                    self._ray.kill(actor, no_restart=True)
                continue
            if info.model_id != self.model_id:
                logger.warning(
                    "cluster node %s embeds with %s, not %s: given no work",
                    node_id[:12],
                    info.model_id,
                    self.model_id,
                )
                self._refused.add(node_id)
                self._ray.kill(actor, no_restart=True)
                continue
            self._nodes[node_id] = _Node(info, actor, time.monotonic())


class _quiet:
    """Killing an actor that is already gone may raise; that is the wanted end state."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True
