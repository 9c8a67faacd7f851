"""Nothing personal or biometric reaches the broker: the leak test.

The telemetry agent publishes to a real broker from this test's process while the real
`edgeid gallery` commands run in the same process (as `edgeid serve` will hold both): canary
subjects with distinctive names are enrolled from real photos and searched with a case number
and a reason, and the search latencies flow into the agent's metrics. An observer records every
message on `#` for the whole run; none may hold a canary name, the case text, image bytes or an
embedding, in any of the encodings checked below. The scanner itself is tested first, on
planted leaks, so that a clean result means something.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from mqtt_broker import Broker, Pki, Received, Recorder

from edgeid import __version__
from edgeid.cli import main
from runtime.config.settings import (
    DeviceSettings,
    Settings,
    TelemetrySettings,
    load_settings,
    save_settings,
)
from runtime.system.metrics import ServiceMetrics
from runtime.telemetry.agent import TelemetryAgent
from runtime.telemetry.schema import HealthReport, check_payload

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
        try:  # a payload that is one base64 blob
            views.append(base64.b64decode(payload, validate=True))
        except ValueError:
            pass
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
def people(lfw_dir: Path, models_dir: Path) -> list[tuple[Path, Path]]:
    """(enrolment photo, probe photo) of the first three people (sorted) with two photos that
    each show exactly one face."""
    from runtime.inference.image_decode import load_image
    from runtime.inference.pipeline import FacePipeline

    pipeline = FacePipeline.load(models_dir, with_embedder=False)
    chosen: list[tuple[Path, Path]] = []
    for folder in sorted((lfw_dir / "images").iterdir()):
        photos = [
            p for p in sorted(folder.glob("*.jpg")) if len(pipeline.detect(load_image(p))) == 1
        ]
        if len(photos) >= 2:
            chosen.append((photos[0], photos[1]))
        if len(chosen) == len(CANARY_NAMES) + 1:  # one more: a probe of someone not enrolled
            return chosen
    pytest.fail("LFW dev has too few people with two single-face photos")


def _embeddings(models_dir: Path, photos: Iterable[Path]) -> list[np.ndarray]:
    from runtime.inference.image_decode import load_image
    from runtime.inference.pipeline import FacePipeline

    pipeline = FacePipeline.load(models_dir)
    vectors = []
    for photo in photos:
        faces = pipeline.embed(load_image(photo))
        vectors += [np.asarray(f.embedding, dtype=np.float32) for f in faces]
    return vectors


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    capsys.readouterr()
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_nothing_personal_or_biometric_is_ever_published(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    models_dir: Path,
    people: list[tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    home = tmp_path / "box"
    (home).mkdir()
    (home / "models").symlink_to(models_dir)
    identity = pki.device(SITE, DEVICE)
    save_settings(
        home,
        Settings(
            device=DeviceSettings(site=SITE, device_id=DEVICE),
            telemetry=TelemetrySettings(
                sink="mqtt",
                broker_port=broker.port,
                ca_file=str(pki.ca.path),
                cert_file=str(identity.cert),
                key_file=str(identity.key),
                interval_s=1.0,
                keepalive_s=5,
                reconnect_min_s=0.2,
                reconnect_max_s=1.0,
                report_enrolled_counts=True,
            ),
        ),
    )
    observer = Recorder(broker, pki.observer, topics=("#",))
    metrics = ServiceMetrics()
    enrolled = [0]
    agent = TelemetryAgent(
        home,
        load_settings(home),
        __version__,
        metrics=metrics,
        backend_state=lambda: "cpu",
        enrolled_faces=lambda: enrolled[0],
    )
    agent.start()
    try:
        observer.wait_for(lambda ms: any(m.payload == b"online" for m in ms), "online")
        h = ["--home", str(home), "--json"]
        _cli(capsys, "gallery", "create", GALLERY, *h)
        for name, (photo, _) in zip(CANARY_NAMES, people, strict=False):
            _cli(
                capsys,
                "gallery", "enroll", GALLERY, str(photo), "--name", name,
                "--legal-basis", LEGAL_BASIS, "--notes", NOTES, *h,
            )  # fmt: skip
            enrolled[0] += 1
        found_names = set()
        for _, probe in people:
            started = time.monotonic()
            result = _cli(
                capsys,
                "gallery", "search", str(probe), "--gallery", GALLERY,
                "--case", CASE, "--reason", REASON, *h,
            )  # fmt: skip
            metrics.record_request(time.monotonic() - started)
            assert isinstance(result, dict)
            found_names |= {str(c["display_name"]) for c in result["candidates"]}
        assert found_names >= set(CANARY_NAMES), "the canaries must really be in this process"
        metrics.record_error()

        def reported_the_searches(ms: list[Received]) -> bool:
            reports = [
                check_payload("health", m.payload)
                for m in ms
                if m.topic == f"edgeid/{SITE}/{DEVICE}/health"
            ]
            return any(
                isinstance(r, HealthReport)
                and r.inference.requests == len(people) + 1
                and r.enrolled_faces == len(CANARY_NAMES)
                for r in reports
            )

        observer.wait_for(reported_the_searches, "a report counting the searches", WAIT_S)
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
    photos = [p for pair in people for p in pair]
    vectors = _embeddings(models_dir, photos)
    assert len(vectors) == len(photos)
    texts = [*CANARY_NAMES, CASE, REASON, NOTES, LEGAL_BASIS, GALLERY]
    needles = text_needles(texts) | embedding_needles(vectors)
    findings = scan(messages, needles)
    assert findings == [], f"{len(findings)} leak(s) in {len(messages)} messages"
    # Every health and event payload passed the strict schema on the wire, too.
    for topic, payload in messages:
        kind = topic.rsplit("/", 1)[1]
        if kind in ("health", "events"):
            check_payload(kind, payload)  # type: ignore[arg-type]
    # Nor did the telemetry code log anything personal.
    telemetry_logs = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("runtime.telemetry")
    )
    assert scan([("log", telemetry_logs.encode())], text_needles(texts)) == []
