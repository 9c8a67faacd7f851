"""The appliance process as it stands: models verified and loaded, a local health endpoint.

Binds to loopback by default: the investigator web UI and API (with authentication and audit)
are what will open the box to the office network, not this endpoint.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

from runtime.inference.backends.selection import BackendChoice
from runtime.inference.manifest import list_manifests
from runtime.inference.pipeline import DetectorName, FacePipeline

logger = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgeid"
    status: ClassVar[dict[str, Any]] = {}
    started: ClassVar[float] = 0.0

    def do_GET(self) -> None:
        if self.path == "/healthz":
            body = json.dumps(self.status | {"uptime_s": self._uptime()}).encode()

            self._reply(200, "application/json", body)
        elif self.path == "/":
            lines = [f"edgeid {self.status['version']}: {self.status['state']}"]
            lines += [f"model {name}" for name in self.status["models"]]
            self._reply(200, "text/plain; charset=utf-8", ("\n".join(lines) + "\n").encode())
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found\n")

    def _uptime(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


def serve(
    models_dir: Path,
    detector: DetectorName,
    backend: BackendChoice,
    host: str,
    port: int,
    version: str,
) -> None:
    """Load and verify the models, then answer health checks until SIGINT/SIGTERM."""
    # Refuses to start on a missing or altered model; falls back to the CPU, degraded, when
    # TensorRT was expected but cannot run.
    pipeline = FacePipeline.load(models_dir, detector, backend=backend)
    _Handler.status = {
        "state": "ready",
        "version": version,
        "backend": pipeline.backend_state,
        "detector": detector,
        "models": [m.name for m in list_manifests(models_dir)],
    }
    _Handler.started = time.monotonic()
    server = ThreadingHTTPServer((host, port), _Handler)
    stop = threading.Event()

    def _shutdown(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    # Said on stderr whatever the log level: the operator who typed `make run` needs the address.
    print(f"edgeid {version} ready on http://{host}:{port} (health: /healthz)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
