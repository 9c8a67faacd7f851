"""What runs on a cluster node: one loaded face pipeline that turns a batch of image bytes
(or of video frames' pixels) into faces (box, landmarks' result, quality, template, aligned
chip), the node's ``inference.ingest_streams`` of them at once (``cases/local_farm.py``).

A node holds no keys, no case number, no file names: it gets an opaque key and the bytes of
each image of its batch, or the pixels of each video frame the owning box sampled (never the
video file, its name or the frame's time), in memory (Ray's object store, which the node keeps
in RAM), and returns the faces. The owning box seals the chips when it writes them into the
case. Nothing here writes to disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeid.runtime.cases.farmed import ImageResult, Job
from edgeid.runtime.cases.local_farm import LocalFarm
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.inference.activity import InferenceLimits
from edgeid.runtime.inference.pipeline import FacePipeline

# The custom Ray resource `edgeid cluster worker` gives each node it starts: one face pipeline
# per node, and only nodes started by edgeid (on a provisioned box) are given work.
NODE_RESOURCE = "edgeid_node"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's mark of the head node
DEFAULT_HOME = Path.home() / ".local" / "share" / "edgeid"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    backend: str  # the pipeline's backend state: "cpu", "tensorrt" or "degraded"
    model_id: str
    head: bool  # the owning box's own node
    pid: int  # the node's analysing process


class FaceNode:
    """One per node (the Ray actor's class): the node's own models on its own backend."""

    def __init__(self, detector: str, max_working_pixels: int, max_faces: int) -> None:
        home = Path(os.environ.get("EDGEID_HOME") or DEFAULT_HOME)
        settings = load_settings(home)
        self.pipeline = FacePipeline.load(
            home / "models",
            detector,  # type: ignore[arg-type]  # the owning box's detector, checked there
            threads=settings.inference.threads,
            backend=settings.inference.backend,
            spinning=settings.inference.spinning,
            precision=settings.inference.precision,  # a mismatch with the owner's: no work
        )
        # The owning box's limits on what is analysed (the same faces wherever a file goes);
        # this node's own on how many photos it analyses at once.
        self.limits = InferenceLimits(
            max_working_pixels=max_working_pixels,
            max_faces=max_faces,
            ingest_streams=settings.inference.ingest_streams,
            max_large_running=settings.inference.max_large_running_jobs,
        )

    def describe(self) -> NodeInfo:
        import ray  # only ever imported on a node, where it is installed

        context: Any = ray.get_runtime_context()
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        embedder = self.pipeline.embedder
        return NodeInfo(
            node_id=str(context.get_node_id()),
            address=str(ray.util.get_node_ip_address()),  # type: ignore[no-untyped-call]
            backend=str(self.pipeline.backend_state),
            model_id=embedder.model_id if embedder else "",
            pid=os.getpid(),
            head=any(
                n["NodeID"] == context.get_node_id() and n["Resources"].get(HEAD_RESOURCE)
                for n in nodes
            ),
        )

    def analyse(self, batch: list[Job]) -> list[ImageResult]:
        """Each job as the owning box's own ingest analyses it (``local_farm.analyse_job``),
        this node's ``inference.ingest_streams`` at once; the results in the batch's order."""
        farm = LocalFarm.on_this_box(self.pipeline, self.limits)
        try:
            results = [result for job in batch for result in farm.submit(job)]
            return results + farm.drain()
        finally:
            farm.close()
