"""The one way an ingest gets its farm on the lab's cluster, for the CLI (``--cluster``) and
the web Cases page (``[cluster] address`` set): the head's address, the site's TLS, the
owning box's detector, model and limits. Ray is imported only here, when a farm is opened."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.service import GalleryService


@contextlib.contextmanager
def open_farm(
    home: Path, settings: Settings, galleries: GalleryService, address: str = ""
) -> Iterator[ImageFarm]:
    """A farm on the cluster whose head is ``address`` (default: ``[cluster] address``)."""
    address = address or settings.cluster.address
    if not address:
        raise BadInputError(
            "--cluster names no head and edgeid.toml has no [cluster] address; give HOST:PORT"
        )
    try:
        from edgeid.runtime.cluster.farm import RayFarm
    except ImportError:
        raise BadInputError(
            "Ray is not installed: pip install 'edgeid[cluster]', or ingest without --cluster"
        ) from None
    from edgeid.runtime.cluster.tls import ClusterTls

    limits = galleries.activity.limits
    with RayFarm(
        address,
        ClusterTls.of(home, settings.cluster),
        detector=settings.inference.detector,
        model_id=galleries.model_id,
        max_working_pixels=limits.max_working_pixels,
        max_faces=limits.max_faces,
        batch_files=settings.cluster.batch_files,
        batches_per_node=settings.cluster.batches_per_node,
        max_inflight_bytes=settings.cluster.inflight_mib << 20,
    ) as farm:
        yield farm
