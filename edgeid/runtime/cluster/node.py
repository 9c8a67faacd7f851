"""What runs on a cluster node: one loaded face pipeline that turns a batch of image bytes
(or of video frames' pixels) into faces (box, landmarks' result, quality, template, aligned
chip).

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
from edgeid.runtime.cases.local_farm import analyse_job
from edgeid.runtime.config.settings import load_settings
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
        )
        self.max_working_pixels = max_working_pixels
        self.max_faces = max_faces

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
        """Each job as the owning box's own ingest analyses it (``local_farm.analyse_job``)."""
        return [
            analyse_job(
                self.pipeline,
                job,
                max_working_pixels=self.max_working_pixels,
                max_faces=self.max_faces,
            )
            for job in batch
        ]
