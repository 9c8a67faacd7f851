"""`edgeid case ingest --cluster`: a real Ray cluster on loopback (a head that also analyses
and one more worker node, each started by `edgeid cluster head|worker` with TLS under a test
site CA), ingesting real LFW photos and a short video. The faces, templates, failures and
clusters must be those of a local ingest of the same media; a worker node killed mid-run costs
only its batches; a run stopped part way resumes without redoing finished files."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image
from test_case_ingest import CASE, Media, build_media, make_home, request, service
from test_case_ingest import cast as cast
from test_case_ingest import pipeline as pipeline
from test_case_video import FPS, write_video

from edgeid.cli import main
from edgeid.provisioning.certificates import CertRequest, ensure_key, make_csr
from edgeid.runtime.cases.ingest import IngestProgress
from edgeid.runtime.cases.store import Case
from edgeid.runtime.inference.activity import InferenceLimits
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.web.tls import TLS_DIR

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI") == "true":
        pytest.fail("ray is not installed (pip install -e '.[dev]'); CI must run this test")
    pytest.skip("ray is not installed: pip install 'edgeid[cluster]'", allow_module_level=True)

# Not ``import ray`` here: Ray's core reads its TLS settings once, when first imported, and the
# farm sets them up before it imports Ray.
from edgeid.runtime.cluster.farm import RayFarm
from edgeid.runtime.cluster.tls import ClusterTls
from edgeid.runtime.config.settings import ClusterSettings


def _own_address() -> str:
    """The address Ray gives a node of this machine (it never binds one to loopback): a UDP
    socket "connected" outwards sends nothing but shows the interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("8.8.8.8", 80))
        return str(s.getsockname()[0])


pytestmark = pytest.mark.timeout(300)
# Ray turns 127.0.0.1 into this machine's own address (it never binds a node to loopback):
# the nodes talk over it, which never leaves this machine, and their certificate names it.
LOCAL_IP = _own_address()
REPO = Path(__file__).resolve().parents[1]


# -- the site CA and the nodes' certificate ---------------------------------------------------


def site_ca_and_node(folder: Path) -> None:
    """A site CA, and a node key and CSR made by provisioning's code, signed by the CA for
    both TLS directions (Ray's servers check their clients too); written as a box holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test site CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key, _ = ensure_key(folder / "cluster.key")
    csr = x509.load_pem_x509_csr(make_csr(key, CertRequest("node", "server", ("localhost",), ())))
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_name)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address(LOCAL_IP)),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "cluster-ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "cluster.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- the cluster ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    address: str
    home: Path  # the owning box's home (the cluster TLS files under tls/)
    head: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]

    def tls(self) -> ClusterTls:
        return ClusterTls.of(self.home, ClusterSettings())


def _node(home: Path, *argv: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGEID_HOME": str(home)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeid", "cluster", *argv, "--home", str(home)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ray's processes die with it
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    home = root / "owner"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    site_ca_and_node(home / TLS_DIR)
    # The worker box: its own home with its own copy of the TLS files and the same models.
    other = root / "worker"
    other.mkdir()
    (other / "models").symlink_to(models_dir)
    shutil.copytree(home / TLS_DIR, other / TLS_DIR)
    port = free_port()
    address = f"{LOCAL_IP}:{port}"
    head = _node(
        home, "head", "--ip", LOCAL_IP, "--port", str(port), "--work", "--cpus", "1",
        "--object-store-bytes", str(100 << 20), log=root / "head.log",
    )  # fmt: skip
    worker: subprocess.Popen[bytes] | None = None
    try:
        _await_nodes(home, address, 1, head, root / "head.log")
        worker = _node(
            other, "worker", "--head", address, "--ip", LOCAL_IP, "--cpus", "1",
            "--object-store-bytes", str(100 << 20), log=root / "worker.log",
        )  # fmt: skip
        _await_nodes(home, address, 2, worker, root / "worker.log")
        yield Cluster(address, home, head, worker)
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)


def _await_nodes(
    home: Path, address: str, count: int, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Waits (in a child process: ray.init in this one would stay connected) for ``count``
    edgeid nodes, each of which must have come up under TLS."""
    probe = (
        "from edgeid.runtime.cluster.tls import ClusterTls;"
        "from edgeid.runtime.config.settings import ClusterSettings; from pathlib import Path;"
        f"ClusterTls.of(Path({str(home)!r}), ClusterSettings()).apply(); import ray;"
        f"ray.init(address={address!r}, logging_level='ERROR');"
        "n = sum(1 for x in ray.nodes() if x['Alive'] and x['Resources'].get('edgeid_node'));"
        "print(n)"
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"a cluster node exited ({proc.returncode}): {log.read_text()[-2000:]}")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0 and int(done.stdout.strip().splitlines()[-1]) >= count:
            return
        time.sleep(2)
    pytest.fail(f"the cluster did not reach {count} nodes: {log.read_text()[-2000:]}")


# -- the media and what an ingest made of them -------------------------------------------------


@pytest.fixture(scope="module")
def media(
    tmp_path_factory: pytest.TempPathFactory,
    cast: tuple[dict[str, list[Path]], list[Path]],
) -> Media:
    root = tmp_path_factory.mktemp("media")
    built = build_media(root, cast)
    pairs, _ = cast
    photos = next(iter(pairs.values()))
    frames = [np.asarray(Image.open(p).convert("RGB"))[:248, :248].copy() for p in photos]
    write_video(built.folder / "clip.mp4", [f for f in frames for _ in range(FPS)])
    return built


# By file hash: box, quality, template, video frame number and time (None for a photo).
Faces = dict[
    str, list[tuple[tuple[int, int, int, int], float, np.ndarray, int | None, float | None]]
]


@dataclass
class Made:
    faces: Faces  # by file hash (in frame, then box order)
    files: dict[str, tuple[str, str | None]]  # by first name: status, reason
    names: dict[str, tuple[str, ...]]  # by file hash: every name
    clusters: set[frozenset[tuple[str, tuple[int, int, int, int], int | None]]]


def made(case: Case) -> Made:
    faces: Faces = {}
    key = {}
    for f in case.faces():
        face = (f.box, f.quality, f.embedding, f.frame, f.time_s)
        faces.setdefault(f.file_sha256, []).append(face)
        key[f.face_id] = (f.file_sha256, f.box, f.frame)
    for found in faces.values():
        found.sort(key=lambda t: (t[3] or 0, t[0]))
    files = {f.names[0]: (f.status, f.reason) for f in case.files()}
    names = {str(f.sha256): tuple(sorted(f.names)) for f in case.files() if f.sha256}
    results = case.results()
    assert results is not None
    clusters = {frozenset(key[i] for i in c.face_ids) for c in results.clusters}
    return Made(faces, files, names, clusters)


def assert_same(local: Made, remote: Made) -> None:
    assert remote.files == local.files
    assert remote.names == local.names
    assert remote.faces.keys() == local.faces.keys()
    for sha, expected in local.faces.items():
        got = remote.faces[sha]
        assert [(g[0], g[3], g[4]) for g in got] == [(e[0], e[3], e[4]) for e in expected], sha
        for (_, q1, t1, *_), (_, q2, t2, *_) in zip(got, expected, strict=True):
            assert abs(q1 - q2) < 1e-4
            assert float(t1 @ t2) > 0.9999  # the same template within float tolerance
    assert remote.clusters == local.clusters


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    pipeline: FacePipeline,
    media: Media,
) -> Made:
    home = make_home(tmp_path_factory.mktemp("local"), models_dir)
    with service(home, pipeline) as cases:
        outcome = cases.ingest(request(media.folder, galleries=(), frame_interval_s=1.0))
        assert outcome.run.status == "complete"
        result = made(outcome.case)
    assert any(status == "failed" for status, _ in result.files.values())
    assert len(result.clusters) >= 4
    assert sum(1 for found in result.faces.values() for f in found if f[3] is not None) >= 2
    return result


def _owner_home(tmp_path: Path, cluster: Cluster, models_dir: Path) -> Path:
    home = make_home(tmp_path, models_dir)
    shutil.copytree(cluster.home / TLS_DIR, home / TLS_DIR)
    return home


def _farm(cluster: Cluster, pipe: FacePipeline, **options: int) -> RayFarm:
    assert pipe.embedder is not None
    return RayFarm(
        cluster.address,
        cluster.tls(),
        detector="mtcnn",
        model_id=pipe.embedder.model_id,
        max_working_pixels=InferenceLimits().max_working_pixels,  # the local ingest's limits
        max_faces=InferenceLimits().max_faces,
        wait_for_nodes_s=60,
        **options,
    )


# -- the tests ---------------------------------------------------------------------------------


def test_cli_cluster_ingest_makes_the_local_faces_templates_and_clusters(
    tmp_path: Path,
    cluster: Cluster,
    models_dir: Path,
    pipeline: FacePipeline,
    media: Media,
    local: Made,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = _owner_home(tmp_path, cluster, models_dir)
    # `--cluster` without an address: the one edgeid.toml names.
    (home / "edgeid.toml").write_text(f'[cluster]\naddress = "{cluster.address}"\n')
    import json

    code = main([
        "case", "ingest", str(media.folder), "--home", str(home), "--json", "--case", CASE,
        "--reason", "seized phone of suspect, warrant W-17/2024",
        "--frame-interval", "1", "--cluster", "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    progress = json.loads(out)["progress"]
    nodes = progress["nodes"]
    assert len(nodes) == 2  # the head's and the worker's, each with its backend and rate
    assert {n["backend"] for n in nodes} == {"cpu"}
    with service(home, pipeline) as cases:
        case = cases.store.find(CASE)
        images = sum(1 for f in case.files() if f.media == "image")
        assert_same(local, made(case))
    assert sum(n["files"] for n in nodes) == images  # every image went to a node, once
    # and every sampled video frame (the video's faces are compared in assert_same)
    assert sum(n["frames"] for n in nodes) == progress["video_frames"] >= 2


def test_a_stopped_cluster_run_resumes_without_redoing_finished_files(
    tmp_path: Path,
    cluster: Cluster,
    models_dir: Path,
    pipeline: FacePipeline,
    media: Media,
    local: Made,
) -> None:
    home = _owner_home(tmp_path, cluster, models_dir)
    stop = threading.Event()

    def progress(p: IngestProgress) -> None:
        if p.files_new >= 3:
            stop.set()  # as the owning box's Ctrl-C or SIGTERM would, between files

    with service(home, pipeline) as cases, _farm(cluster, pipeline, batch_files=2) as farm:
        first = cases.ingest(
            request(media.folder, galleries=(), frame_interval_s=1.0), progress=progress,
            stop=stop, farm=farm,
        )  # fmt: skip
        assert first.run.status == "stopped"
        done = first.progress.files_new + first.progress.files_failed
        second = cases.ingest(request(media.folder, galleries=(), frame_interval_s=1.0), farm=farm)
        assert second.run.status == "complete"
        assert second.progress.files_already_done >= done
        assert_same(local, made(second.case))


def test_bytes_in_flight_are_bounded_whatever_the_nodes(
    tmp_path: Path,
    cluster: Cluster,
    models_dir: Path,
    pipeline: FacePipeline,
    media: Media,
    local: Made,
) -> None:
    """The owning box's object store holds what is in flight and must never fill (it does not
    spill to disk): with a cap smaller than any image only one batch is ever out, on any node."""
    most = 0

    def progress(p: IngestProgress) -> None:
        nonlocal most
        most = max(most, sum(int(str(n["in_flight"])) for n in p.nodes))

    home = _owner_home(tmp_path, cluster, models_dir)
    with (
        service(home, pipeline) as cases,
        _farm(cluster, pipeline, batch_files=1, max_inflight_bytes=1) as farm,
    ):
        outcome = cases.ingest(
            request(media.folder, galleries=(), frame_interval_s=1.0), progress=progress,
            farm=farm,
        )  # fmt: skip
        assert outcome.run.status == "complete"
        assert most == 1
        assert_same(local, made(outcome.case))


def test_a_worker_killed_mid_run_costs_only_its_batches(
    tmp_path: Path,
    cluster: Cluster,
    models_dir: Path,
    pipeline: FacePipeline,
    media: Media,
    local: Made,
) -> None:
    home = _owner_home(tmp_path, cluster, models_dir)
    killed = threading.Event()

    def progress(p: IngestProgress) -> None:
        busy = [n for n in p.nodes if n["alive"] and not n["head"] and n["in_flight"]]
        if not killed.is_set() and busy:
            # The worker box dies with batches in flight: its Ray processes and the process
            # analysing them (Ray starts that one in a process group of its own).
            _stop(cluster.worker)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(str(busy[0]["pid"])), signal.SIGKILL)
            killed.set()

    with service(home, pipeline) as cases, _farm(cluster, pipeline, batch_files=1) as farm:
        outcome = cases.ingest(
            request(media.folder, galleries=(), frame_interval_s=1.0), progress=progress,
            farm=farm,
        )  # fmt: skip
        assert killed.is_set()
        assert outcome.run.status == "complete"
        nodes = outcome.progress.nodes
        assert [(n["head"], n["alive"]) for n in nodes].count((False, False)) == 1, nodes
        assert sum(int(str(n["batches_lost"])) for n in nodes) >= 1
        assert_same(local, made(outcome.case))


def _node_ids(home: Path, address: str) -> set[str]:
    """The live edgeid nodes' ids (asked from a child process, as ``_await_nodes``)."""
    probe = (
        "from edgeid.runtime.cluster.tls import ClusterTls;"
        "from edgeid.runtime.config.settings import ClusterSettings; from pathlib import Path;"
        f"ClusterTls.of(Path({str(home)!r}), ClusterSettings()).apply(); import ray;"
        f"ray.init(address={address!r}, logging_level='ERROR');"
        "print(' '.join(x['NodeID'] for x in ray.nodes() "
        "if x['Alive'] and x['Resources'].get('edgeid_node')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.strip().splitlines()[-1].split()) if done.stdout.strip() else set()


def test_a_node_that_joins_mid_run_takes_work(
    tmp_path: Path,
    cluster: Cluster,
    models_dir: Path,
    pipeline: FacePipeline,
    media: Media,
    local: Made,
) -> None:
    """Another box's `edgeid cluster worker` started while the ingest runs. The ingest waits
    (in its progress callback, between files) until Ray lists the new node, so the files left
    are known to be many: the farm looks for nodes every few seconds and gives a fresh node the
    next batch."""
    home = _owner_home(tmp_path, cluster, models_dir)
    late = tmp_path / "late"
    late.mkdir()
    (late / "models").symlink_to(models_dir)
    shutil.copytree(cluster.home / TLS_DIR, late / TLS_DIR)
    joined: list[str] = []
    proc: list[subprocess.Popen[bytes]] = []

    def progress(p: IngestProgress) -> None:
        if proc or p.phase != "reading" or p.files_new < 1:
            return
        before = _node_ids(cluster.home, cluster.address)
        started = _node(
            late, "worker", "--head", cluster.address, "--ip", LOCAL_IP, "--cpus", "1",
            "--object-store-bytes", str(100 << 20), log=tmp_path / "late.log",
        )  # fmt: skip
        proc.append(started)
        deadline = time.monotonic() + 120
        while not joined and time.monotonic() < deadline:
            if proc[0].poll() is not None:
                pytest.fail(f"the late node exited: {(tmp_path / 'late.log').read_text()[-2000:]}")
            joined.extend(_node_ids(cluster.home, cluster.address) - before)
        assert joined, "the late node never registered"
        assert p.files_seen < p.files_total - 3, "too little left for the late node"

    try:
        with service(home, pipeline) as cases, _farm(cluster, pipeline, batch_files=1) as farm:
            outcome = cases.ingest(
                request(media.folder, galleries=(), frame_interval_s=1.0), progress=progress,
                farm=farm,
            )  # fmt: skip
            assert outcome.run.status == "complete"
            nodes = {str(n["node"]): n for n in outcome.progress.nodes}
            assert len(joined) == 1
            newcomer = nodes[joined[0][:12]]  # listed in the progress, with its backend
            assert newcomer["backend"] == "cpu" and not newcomer["head"]
            assert int(str(newcomer["files"])) + int(str(newcomer["frames"])) >= 1, nodes
            assert_same(local, made(outcome.case))
    finally:
        for started in proc:
            _stop(started)


def test_a_client_without_the_site_certificate_cannot_join(cluster: Cluster) -> None:
    """Ray's TLS both ways: a process without a certificate the site CA signed never reaches
    the cluster (it would otherwise be able to run code on the nodes and read their memory)."""
    probe = f"import ray; ray.init(address={cluster.address!r}); print('joined')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with pytest.raises(subprocess.TimeoutExpired) as waited:
        subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=15)
    assert b"joined" not in (waited.value.stdout or b"")


def test_only_a_provisioned_box_starts_a_node(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No cluster files, or a certificate another CA signed: refused (exit 2) before Ray runs."""
    home = make_home(tmp_path, models_dir)
    assert main(["cluster", "worker", "--head", "10.0.0.5:6380", "--home", str(home)]) == 2
    assert "no cluster site CA" in capsys.readouterr().err
    site_ca_and_node(home / TLS_DIR)
    other = tmp_path / "other"
    site_ca_and_node(other)
    shutil.copy(other / "cluster-ca.crt", home / TLS_DIR / "cluster-ca.crt")  # a foreign CA
    assert main(["cluster", "head", "--home", str(home)]) == 2
    assert "not signed by the site CA" in capsys.readouterr().err
