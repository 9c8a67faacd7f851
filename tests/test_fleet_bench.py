"""`python -m benchmarks.fleet_bench` at a small scale: 20 virtual boxes, each with its own
client certificate, against a real Mosquitto with the product's ACL and a real
`edgeid fleet serve`; every report arrives, every box is listed, the pages answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from mqtt_broker import mosquitto_path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = 20
INTERVAL_S = 1
DURATION_S = 4


def test_twenty_boxes_lose_no_report_and_are_all_listed(tmp_path: Path) -> None:
    mosquitto_path()  # skips (fails under CI) without a broker
    result = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.fleet_bench", "--devices", str(DEVICES),
            "--interval", str(INTERVAL_S), "--duration", str(DURATION_S),
            "--probe-every", "0.25", "--work", str(tmp_path), "--json",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout)

    reports = DEVICES * DURATION_S // INTERVAL_S
    assert figures["connected"] == DEVICES
    assert figures["devices_listed"] == DEVICES
    assert figures["sent"] == figures["acked"] == figures["received"] == reports
    assert figures["devices_with_loss"] == 0 and figures["refused"] == 0
    assert figures["sent_per_device"] == figures["received_per_device"] == {"min": 4, "max": 4}
    for path in ("/", "/metrics"):
        latency = figures["latency"][path]
        assert latency["requests"] >= 2 and latency["failures"] == 0
        assert latency["body_bytes"] > 0 and latency["p99_ms"] >= latency["p50_ms"] > 0
    assert figures["fleet_manager"]["rss_mib"] > 0
    assert figures["fleet_manager"]["ingest_window_messages"] == reports // 2

    # Every box had a certificate of its own, named as its topics are (CN <site>/<device>).
    names = set()
    for pem in (tmp_path / "pki" / "devices").glob("*.pem"):
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        names.add(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert len(names) == DEVICES
    assert names == {f"site-000/box-{i:05d}" for i in range(DEVICES)}
