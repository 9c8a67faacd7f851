"""Nothing personal or biometric reaches the broker: the leak test.

The telemetry agent publishes to a real broker from this test's process while gallery work
runs in the same process (as `edgeid serve` will hold both): canary subjects with distinctive
names are enrolled from real photos through the gallery service, searched with the real
`edgeid gallery search` command (a case number and a reason), and every request's latency
flows into the agent's metrics. An observer records every message on `#` for the whole run;
none may hold a canary name, the case text, image bytes or an embedding, in any of the
encodings checked below. The scanner itself is tested first, on planted leaks, so that a clean
result means something.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from mqtt_broker import Broker, Pki, Received, Recorder

from edgeid import __version__
from edgeid.cli import main
from edgeid.runtime.config.settings import (
    DeviceSettings,
    Settings,
    TelemetrySettings,
    load_settings,
    save_settings,
)
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.system.metrics import ServiceMetrics
from edgeid.runtime.telemetry.agent import TelemetryAgent
from edgeid.runtime.telemetry.schema import HealthReport, check_payload

CANARY_NAMES = ("Quillon Vexmarrow", "Odalys Brennquist", "Tamsin Wolversaint")
CASE = "CANARY-CASE-88412"
REASON = "canary reason zephyrine lattice"
NOTES = "canary note obsidian marmalade"
LEGAL_BASIS = "canary warrant KESTREL-7731"
GALLERY = "canary-gallery"
SITE, DEVICE = "leak", "box-9"
WAIT_S = 60.0

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Base64 of the two magics as they start an encoded file: "/9j/" and "iVBORw0KGgo".
IMAGE_MAGIC_B64 = (b"/9j/", b"iVBORw0KGgo")
EMBEDDING_WINDOW = 4  # consecutive components: 16 bytes as float32, too many to match by chance


# -- the scanner ---------------------------------------------------------------------------------


def _b64_forms(data: bytes) -> list[bytes]:
    """Base64 of ``data`` at each of the three alignments, trimmed to the bytes that do not
    depend on what surrounds it (so it is found inside a longer encoded blob)."""
    forms = []
    for shift, start in ((0, 0), (1, 2), (2, 3)):  # characters fed by the unknown lead bytes
        encoded = base64.b64encode(b"\0" * shift + data)
        forms.append(encoded[start : len(encoded) - 4])  # the last group depends on what follows
    return [f for f in forms if len(f) >= 8]


def text_needles(texts: Iterable[str]) -> dict[bytes, str]:
    """Every encoding of each text we look for, mapped to a description of the finding."""
    needles: dict[bytes, str] = {}
    for text in texts:
        for variant in {text, text.lower(), text.upper(), text.replace(" ", "_")}:
            raw = variant.encode("utf-8")
            needles[raw] = f"{text!r} as UTF-8"
            needles[variant.encode("utf-16-le")] = f"{text!r} as UTF-16-LE"
            needles[variant.encode("utf-16-be")] = f"{text!r} as UTF-16-BE"
            needles[raw.hex().encode()] = f"{text!r} as hex"
            needles[raw.hex().upper().encode()] = f"{text!r} as HEX"
            for form in _b64_forms(raw):
                needles[form] = f"{text!r} as base64"
        for word in text.split():  # a distinctive surname on its own
            if len(word) >= 7:
                needles[word.lower().encode()] = f"{word!r} from {text!r}"
    return needles


def embedding_needles(embeddings: Iterable[np.ndarray]) -> dict[bytes, str]:
    needles: dict[bytes, str] = {}
    for n, vector in enumerate(embeddings):
        v32 = np.asarray(vector, dtype=np.float32)
        for i in range(0, len(v32) - EMBEDDING_WINDOW + 1):
            window = v32[i : i + EMBEDDING_WINDOW]
            needles[window.astype("<f4").tobytes()] = f"embedding {n} float32 LE at {i}"
            needles[window.astype(">f4").tobytes()] = f"embedding {n} float32 BE at {i}"
            needles[window.astype("<f8").tobytes()] = f"embedding {n} float64 at {i}"
        for i, value in enumerate(v32):
            # Six decimals (truncated, and rounded): the schema carries at most three, so no
            # honest telemetry number has a run of six decimals to collide with.
            digits = repr(float(abs(value)))
            if "e" not in digits and len(digits) >= 8:
                needles[digits[:8].encode()] = f"embedding {n} component {i} as text"
                needles[f"{abs(float(value)):.6f}".encode()] = f"embedding {n} component {i}"
    return needles


def scan(messages: Iterable[tuple[str, bytes]], needles: dict[bytes, str]) -> list[str]:
    """Findings: each message (topic and payload, as bytes and base64-decoded) that holds a
    needle or image magic bytes."""
    findings = []
    for topic, payload in messages:
        views = [topic.encode(), payload]
        with contextlib.suppress(ValueError):  # a payload that is one base64 blob
            views.append(base64.b64decode(payload, validate=True))
        for view in views:
            for magic in (JPEG_MAGIC, PNG_MAGIC, *IMAGE_MAGIC_B64):
                if magic in view:
                    findings.append(f"{topic}: image bytes {magic!r}")
            lowered = view.lower()
            for needle, what in needles.items():
                if needle in view or (needle.isascii() and needle.lower() in lowered):
                    findings.append(f"{topic}: {what}")
    return findings


def test_the_scanner_finds_planted_leaks() -> None:
    """A leak test is only as good as its scanner: each planted leak must be found."""
    rng = np.random.default_rng(5)
    vector = rng.standard_normal(128).astype(np.float32)
    vector /= np.linalg.norm(vector)
    needles = text_needles([CANARY_NAMES[0], CASE]) | embedding_needles([vector])
    name = CANARY_NAMES[0].encode()
    planted = {
        "utf8": b'{"x":"' + name + b'"}',
        "utf16": CANARY_NAMES[0].encode("utf-16-le"),
        "b64": b'{"x":"' + base64.b64encode(b"note: " + name + b"!") + b'"}',
        "hex": name.hex().encode(),
        "lower": name.lower(),
        "surname": b"vexmarrow",
        "case": CASE.encode(),
        "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF",
        "jpeg64": base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01"),
        "png": PNG_MAGIC + b"\x00\x00",
        "floats": b"pad" + vector[10:20].astype("<f4").tobytes(),
        "json-floats": json.dumps([float(x) for x in vector[:5]]).encode(),
        "whole-b64": base64.b64encode(vector.tobytes()),
    }
    for label, payload in planted.items():
        assert scan([("t", payload)], needles), f"the scanner missed the {label} leak"
    clean = json.dumps({"cpu": 12.345, "load": [0.5, 0.25], "t": 1767225600.125}).encode()
    assert scan([("edgeid/site/box/health", clean)], needles) == []


# -- the run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> FacePipeline:
    return FacePipeline.load(models_dir)


@pytest.fixture(scope="module")
def people(lfw_dir: Path, pipeline: FacePipeline) -> list[tuple[Path, Path]]:
    """(enrolment photo, probe photo) of the first people (sorted) with two photos that each
    show exactly one face: one per canary, and one more who is never enrolled."""
    chosen: list[tuple[Path, Path]] = []
    for folder in sorted((lfw_dir / "images").iterdir()):
        photos = [
            p for p in sorted(folder.glob("*.jpg")) if len(pipeline.detect(load_image(p))) == 1
        ]
        if len(photos) >= 2:
            chosen.append((photos[0], photos[1]))
        if len(chosen) == len(CANARY_NAMES) + 1:
            return chosen
    pytest.fail("LFW dev has too few people with two single-face photos")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    capsys.readouterr()
    assert main(list(argv)) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, dict)
    return out


def _device_home(tmp_path: Path, broker: Broker, pki: Pki, models_dir: Path) -> Path:
    home = tmp_path / "box"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    identity = pki.device(SITE, DEVICE)
    telemetry = TelemetrySettings(
        sink="mqtt",
        broker_port=broker.port,
        ca_file=str(pki.ca.path),
        cert_file=str(identity.cert),
        key_file=str(identity.key),
        interval_s=1.0,
        keepalive_s=5,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
        report_enrolled_counts=True,  # a number of faces is not personal; exercise the path
    )
    save_settings(
        home, Settings(device=DeviceSettings(site=SITE, device_id=DEVICE), telemetry=telemetry)
    )
    return home


def test_nothing_personal_or_biometric_is_ever_published(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    models_dir: Path,
    pipeline: FacePipeline,
    people: list[tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    home = _device_home(tmp_path, broker, pki, models_dir)
    health_topic = f"edgeid/{SITE}/{DEVICE}/health"
    observer = Recorder(broker, pki.observer, topics=("#",))
    metrics = ServiceMetrics()
    enrolled = [0]
    agent = TelemetryAgent(
        home,
        load_settings(home),
        __version__,
        metrics=metrics,
        backend_state=lambda: pipeline.backend_state,
        enrolled_faces=lambda: enrolled[0],
    )
    templates: list[np.ndarray] = []
    agent.start()
    try:
        observer.wait_for(lambda ms: any(m.payload == b"online" for m in ms), "online")
        # Enrolment through the gallery service, sharing this process and its pipeline.
        with GalleryService.open(home, pipeline=pipeline) as service:
            service.store.create_gallery(GALLERY)
            for name, (photo, _) in zip(CANARY_NAMES, people, strict=False):
                started = time.monotonic()
                service.enroll(
                    GALLERY,
                    display_name=name,
                    legal_basis=LEGAL_BASIS,
                    enrolled_by="officer-canary",
                    image_bytes=photo.read_bytes(),
                    notes=NOTES,
                )
                metrics.record_request(time.monotonic() - started)
                enrolled[0] += 1
            for photo in [p for pair in people for p in pair]:
                templates.append(service.analyse(photo.read_bytes()).template(0))
        # Searches through the real command, with the case number and the reason.
        searches = [people[0][1], people[-1][1]]  # a canary's other photo; someone not enrolled
        found: set[str] = set()
        for probe in searches:
            started = time.monotonic()
            result = _cli(
                capsys,
                "gallery", "search", str(probe), "--gallery", GALLERY,
                "--case", CASE, "--reason", REASON, "--home", str(home), "--json",
            )  # fmt: skip
            metrics.record_request(time.monotonic() - started)
            candidates = result["candidates"]
            assert isinstance(candidates, list)
            found |= {str(c["display_name"]) for c in candidates}
        assert CANARY_NAMES[0] in found, "the canaries must really be in this process"
        metrics.record_error()
        requests = len(CANARY_NAMES) + len(searches) + 1

        def reports(ms: list[Received]) -> list[HealthReport]:
            return [
                r
                for r in (check_payload("health", m.payload) for m in ms if m.topic == health_topic)
                if isinstance(r, HealthReport)
            ]

        observer.wait_for(
            lambda ms: (
                sum(r.inference.requests for r in reports(ms)) >= requests
                and any(r.enrolled_faces == len(CANARY_NAMES) for r in reports(ms))
            ),
            "reports counting every request",
            WAIT_S,
        )
        agent.event("update_applied")
    finally:
        agent.stop()
    observer.wait_for(
        lambda ms: any(m.payload == b"offline" for m in ms), "offline after the stop", WAIT_S
    )
    observer.close()

    messages = [(m.topic, m.payload) for m in observer.messages]
    topics = {topic for topic, _ in messages}
    assert topics == {f"edgeid/{SITE}/{DEVICE}/{kind}" for kind in ("status", "health", "events")}
    assert sum(r.inference.requests for r in reports(observer.messages)) == requests
    assert len(templates) == 2 * len(people)
    texts = [*CANARY_NAMES, CASE, REASON, NOTES, LEGAL_BASIS, GALLERY, "officer-canary"]
    findings = scan(messages, text_needles(texts) | embedding_needles(templates))
    assert findings == [], f"{len(findings)} leak(s) in {len(messages)} messages"
    # Nor did the telemetry code log anything personal.
    telemetry_logs = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("edgeid.runtime.telemetry")
    )
    assert scan([("log", telemetry_logs.encode())], text_needles(texts)) == []
