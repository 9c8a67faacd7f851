"""Hostile load: ordinary searches alone, then beside concurrent hostile uploads, in one run.

The service runs in a child process (the real app and uvicorn on a loopback port, plain HTTP:
nothing leaves the box) over a fresh home with a few LFW subjects; this process drives it
over HTTP and samples the child's resident memory from /proc. Hostile uploads are the photos of
issue 13 finding 10: a 7000x7000 PNG (small on the wire, 49 megapixels), an 8000x6000 JPEG
and a crowd of faces; each hostile client sends one after another for the whole phase.

Reported (JSON on stdout): the service's idle RSS at start and after the load, its peak RSS,
p50/p99 of ordinary searches (create, upload, candidates) alone and under load, and what the
hostile uploads were answered (200, 503 with Retry-After).

    python -m benchmarks.hostile_load [--data DIR] [--hostile 8] [--searches 20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

# Subjects enrolled in the searched gallery (LFW folders with at least two photos).
SUBJECTS = 5
HOSTILE_CLIENTS = 8
ORDINARY_SEARCHES = 20
# RSS is sampled this often while the load runs.
SAMPLE_S = 0.05
# The service gets this long to settle (and hand memory back) before idle RSS is read.
SETTLE_S = 2.0
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
CASE = {"case": "2026/0001", "reason": "benchmark of the service under hostile uploads"}


def hostile_photos(face: Image.Image) -> dict[str, bytes]:
    """Finding 10's photos: inside every limit, heavy to analyse."""
    photos: dict[str, bytes] = {}
    big = Image.new("L", (7000, 7000), 120)
    big.paste(face.convert("L").resize((400, 400)), (3300, 3300))
    photos["png_7000x7000"] = _encoded(big, "PNG", compress_level=9)
    del big
    wide = Image.new("RGB", (8000, 6000), (120, 118, 121))
    wide.paste(face.resize((400, 400)), (3800, 2800))
    photos["jpeg_8000x6000"] = _encoded(wide, "JPEG", quality=85)
    del wide
    tile = face.resize((60, 60))
    crowd = Image.new("RGB", (3000, 1500), (120, 118, 121))
    for row in range(1500 // 75):
        for col in range(3000 // 75):
            crowd.paste(tile, (col * 75 + 7, row * 75 + 7))
    photos["crowd_800_faces"] = _encoded(crowd, "JPEG", quality=90)
    return photos


def _encoded(image: Image.Image, kind: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def _lfw_people(data: Path, count: int) -> list[list[Path]]:
    images = data / "lfw-dev" / "images"
    people = []
    for folder in sorted(images.iterdir()):
        photos = sorted(folder.glob("*.jpg"))
        if len(photos) >= 2:
            people.append(photos)
        if len(people) == count:
            break
    return people


# -- the service (child process) --------------------------------------------------------------


def serve(home: Path, port: int, data: Path) -> None:
    """The real app over a fresh home, on 127.0.0.1:``port``; prints its API token, then serves."""
    from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
    from edgeid.runtime.accounts.sealing import accounts_key
    from edgeid.runtime.accounts.tokens import TokenStore
    from edgeid.runtime.accounts.users import UserStore
    from edgeid.runtime.audit import AuditLog
    from edgeid.runtime.cases.service import CaseService
    from edgeid.runtime.config.settings import load_settings
    from edgeid.runtime.gallery.service import GalleryService
    from edgeid.runtime.web.app import create_app
    from edgeid.runtime.web.server import run_web

    settings = load_settings(home)
    with GalleryService.open(home, settings) as galleries:
        galleries.create_gallery("bench", "hostile load benchmark")
        for number, photos in enumerate(_lfw_people(data, SUBJECTS), start=1):
            galleries.enroll(
                "bench",
                display_name=f"Subject {number}",
                legal_basis="benchmark",
                enrolled_by="setup",
                image_bytes=photos[0].read_bytes(),
                face_index=0,
                allow_duplicate=True,
            )
        accounts = accounts_key(galleries.store.keyring)
        users = UserStore(home, accounts)
        held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
        tokens = {}
        # Two users: the hostile one's many searches never crowd out the ordinary one's.
        for name in ("ordinary", "hostile"):
            _, once = users.create(name, Role.INVESTIGATOR, galleries=("bench",))
            users.change_password(name, once, "bench-password-long-enough")
            _, tokens[name] = TokenStore(home, accounts).create(name, name, held, allowed=held)
        with (
            AuditLog.open(home, galleries.store.keyring) as audit,
            CaseService(home, galleries, audit, detector=settings.inference.detector) as cases,
        ):
            app = create_app(
                home, settings, galleries=galleries, audit=audit, version="bench", cases=cases
            )
            print(json.dumps(tokens), flush=True)
            run_web(app, settings, host="127.0.0.1", port=port)


# -- the driver (this process) ----------------------------------------------------------------


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.peak = max(self.peak, _rss_mb(self.pid))


def _search(api: httpx.Client, photo: bytes) -> tuple[float, int]:
    """One ordinary search: create, upload, candidates; its seconds and final status."""
    started = time.perf_counter()
    search = api.post("/api/v1/searches", json=CASE)
    if search.status_code != 201:
        return time.perf_counter() - started, search.status_code
    sid = search.json()["search_id"]
    upload = api.put(
        f"/api/v1/searches/{sid}/photo", content=photo, headers={"Content-Type": "image/jpeg"}
    )
    if upload.status_code != 200:
        return time.perf_counter() - started, upload.status_code
    found = api.post(f"/api/v1/searches/{sid}/faces/0/candidates", json={"k": 5})
    return time.perf_counter() - started, found.status_code


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


def _ordinary(api: httpx.Client, probes: list[bytes], count: int) -> dict[str, object]:
    timings, statuses = [], Counter[int]()
    for i in range(count):
        seconds, status = _search(api, probes[i % len(probes)])
        timings.append(seconds)
        statuses[status] += 1
    return {"searches": count, "statuses": dict(statuses), **_percentiles(timings)}


def run(
    data: Path, models: Path, *, hostile: int = HOSTILE_CLIENTS, searches: int = ORDINARY_SEARCHES
) -> dict[str, object]:
    people = _lfw_people(data, SUBJECTS)
    probes = [photos[1].read_bytes() for photos in people]
    face = Image.open(people[0][0]).convert("RGB").crop((60, 50, 190, 200))
    photos = hostile_photos(face)
    with tempfile.TemporaryDirectory(prefix="edgeid-hostile-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "models").symlink_to(models.resolve())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        env = os.environ | {"EDGEID_HOME": str(home)}
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.hostile_load",
                "--serve",
                str(home),
                str(port),
                "--data",
                str(data),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout is not None
            tokens = json.loads(child.stdout.readline())
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    httpx.get(base + "/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or child.poll() is not None:
                        raise RuntimeError("the service did not start") from None
                    time.sleep(0.2)
            headers = {"Authorization": f"Bearer {tokens['ordinary']}"}
            attacker = {"Authorization": f"Bearer {tokens['hostile']}"}
            with httpx.Client(base_url=base, headers=headers, timeout=REQUEST_TIMEOUT_S) as api:
                _search(api, probes[0])  # warm-up: first-call costs are not the service's size
                time.sleep(SETTLE_S)
                idle_start = _rss_mb(child.pid)
                alone = _ordinary(api, probes, searches)
                sampler = _Sampler(child.pid)
                sampler.start()
                answered: Counter[str] = Counter()
                retry_after: set[str] = set()
                stop = threading.Event()
                lock = threading.Lock()

                def attack(number: int) -> None:
                    kinds = list(photos)
                    with httpx.Client(
                        base_url=base, headers=attacker, timeout=REQUEST_TIMEOUT_S
                    ) as own:
                        i = number
                        while not stop.is_set():
                            kind = kinds[i % len(kinds)]
                            i += 1
                            sid = own.post("/api/v1/searches", json=CASE).json()["search_id"]
                            reply = own.put(
                                f"/api/v1/searches/{sid}/photo",
                                content=photos[kind],
                                headers={"Content-Type": "image/jpeg"},
                            )
                            with lock:
                                answered[f"{kind} {reply.status_code}"] += 1
                                if reply.status_code == 503:
                                    retry_after.add(reply.headers.get("Retry-After", "missing"))

                attackers = [threading.Thread(target=attack, args=(n,)) for n in range(hostile)]
                for thread in attackers:
                    thread.start()
                time.sleep(1.0)  # the hostile uploads are in flight before the searches start
                loaded = _ordinary(api, probes, searches)
                stop.set()
                for thread in attackers:
                    thread.join()
                sampler.stop.set()
                sampler.join()
                _search(api, probes[0])  # back to ordinary work, then idle
                time.sleep(SETTLE_S)
                idle_end = _rss_mb(child.pid)
                peak_hwm = _rss_mb(child.pid, "VmHWM")
        finally:
            child.terminate()
            child.wait(timeout=60)
    return {
        "machine": f"{os.cpu_count()} cores",
        "hostile_clients": hostile,
        "hostile_photos_bytes": {kind: len(body) for kind, body in photos.items()},
        "searches_alone": alone,
        "searches_under_load": loaded,
        "hostile_answers": dict(sorted(answered.items())),
        "retry_after_values": sorted(retry_after),
        "rss_mb": {
            "idle_start": round(idle_start),
            "peak_under_load": round(max(sampler.peak, peak_hwm)),
            "idle_after": round(idle_end),
            "idle_growth": round(idle_end - idle_start),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("EDGEID_TEST_DATA", "../shared/data"))
    )
    parser.add_argument("--hostile", type=int, default=HOSTILE_CLIENTS)
    parser.add_argument("--searches", type=int, default=ORDINARY_SEARCHES)
    parser.add_argument("--serve", nargs=2, metavar=("HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), args.data)
        return 0
    if not (args.data / "lfw-dev").is_dir():
        print(f"benchmark data not found at {args.data}", file=sys.stderr)
        return 2
    models = Path(os.environ.get("EDGEID_HOME", "var")) / "models"
    result = run(args.data, models, hostile=args.hostile, searches=args.searches)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
