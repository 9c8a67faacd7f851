"""Schemathesis against the live ``/api/v1`` over its own OpenAPI document: with an
investigator's and an admin's token, generated requests get no server error, no status the
document does not name for that operation, no response outside its schema and no content type
other than the documented one.

A bounded number of examples per operation (derandomized) keeps it to well under a minute on
top of the box; a failure names the operation and a curl line to reproduce it.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from web_support import (
    OFFICE,
    PEOPLE,
    WORK_CASE,
    WORK_HEADERS,
    WORK_REASON,
    Box,
    build_box,
    free_port,
    lfw_image,
    serving,
    tls_settings,
)

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.tokens import TokenStore

API = "/api/v1"
EXAMPLES_PER_OPERATION = 3
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
ROLES = (Role.INVESTIGATOR, Role.ADMIN)


@dataclass
class Served:
    box: Box
    url: str
    tokens: dict[Role, str]
    real: dict[str, str]  # path parameter -> an id that exists (a search, a case, a subject)


def token(box: Box, role: Role) -> str:
    held = ROLE_PERMISSIONS[role]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[role], f"schema {role.value}", held, allowed=held
    )
    return secret


def real_ids(box: Box, lfw_dir: Path, secret: str) -> dict[str, str]:
    """A search with a photo, a finished case ingest and an enrolled subject, made through
    the API as the investigator: ids that let generated requests reach real answers."""
    api = TestClient(box.app, base_url="https://testserver")
    api.headers["Authorization"] = f"Bearer {secret}"
    person, _, probe = PEOPLE[0]
    photo = lfw_image(lfw_dir, person, probe).read_bytes()
    made = api.post(f"{API}/searches", json={"case": WORK_CASE, "reason": WORK_REASON})
    assert made.status_code == 201, made.text
    search_id = made.json()["search_id"]
    sent = api.put(
        f"{API}/searches/{search_id}/photo", content=photo, headers={"Content-Type": "image/jpeg"}
    )
    assert sent.status_code == 200, sent.text
    ingest = api.post(f"{API}/case-ingests", json={"case": WORK_CASE, "reason": WORK_REASON})
    assert ingest.status_code == 201, ingest.text
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("phone/a.jpg", photo)
    job = api.put(
        f"{API}/case-ingests/{ingest.json()['ingest_id']}/archive",
        content=buffer.getvalue(),
        headers={"Content-Type": "application/zip"},
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    running = box.app.state.web.cases.jobs.get(box.users[Role.INVESTIGATOR], job_id)
    assert running.job.wait(timeout=300), "the case ingest did not finish"
    subject_id = box.subjects[person]
    return {
        "search_id": search_id,
        "face_index": "0",
        "job_id": job_id,
        "case_id": str(api.get(f"{API}/case-jobs/{job_id}").json()["case_id"]),
        "gallery": OFFICE,
        "subject_id": subject_id,
        "face_id": box.service.faces(OFFICE, subject_id)[0].face_id,
        "username": box.users[Role.INVESTIGATOR],
    }


def on_real_ids(case: schemathesis.Case, real: dict[str, str]) -> bool:
    """Point a generated read (or a search step) at ids that exist; False: leave it as is.
    Changes (erasure, revocation, password resets) keep their generated ids."""
    reads = case.method == "GET" or case.path.startswith(f"{API}/searches/")
    names = set(case.path_parameters or {})
    if not reads or not names or not names <= real.keys():
        return False
    case.path_parameters = {name: real[name] for name in names}
    return True


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path
) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("schema")
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        tokens = {role: token(box, role) for role in ROLES}
        real = real_ids(box, lfw_dir, tokens[Role.INVESTIGATOR])
        with serving(box.app, box.settings, free_port()) as url:
            yield Served(box, url, tokens, real)
    finally:
        box.close()


@pytest.fixture(scope="module")
def api_schema(served: Served) -> schemathesis.BaseSchema:
    document = httpx.get(f"{served.url}{API}/openapi.json", verify=False, timeout=30).json()
    return schemathesis.openapi.from_dict(document)


def test_api_keeps_to_its_document(api_schema: schemathesis.BaseSchema, served: Served) -> None:
    failures = []
    statuses: list[int] = []
    for loaded in api_schema.get_all_operations():
        operation = loaded.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def calls(case: schemathesis.Case) -> None:
            send(case)
            if on_real_ids(case, served.real):
                send(case)

        def send(case: schemathesis.Case) -> None:
            for role in ROLES:
                headers = {"Authorization": f"Bearer {served.tokens[role]}", **WORK_HEADERS}
                answered = case.call_and_validate(
                    base_url=served.url, headers=headers, checks=CHECKS, verify=False, timeout=60
                )
                statuses.append(answered.status_code)

        try:
            calls()
        except Exception as exc:  # every operation's failure, not only the first
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # The run reached real answers, not only refusals of made-up ids.
    assert sum(200 <= s < 300 for s in statuses) >= 30, sorted(set(statuses))


def test_document_types_every_answer_and_names_its_refusals(served: Served) -> None:
    doc = httpx.get(f"{served.url}{API}/openapi.json", verify=False, timeout=30).json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]

    def ok_schema(path: str, method: str) -> dict[str, object]:
        responses = paths[API + path][method]["responses"]
        status = next(s for s in responses if s.startswith("2"))
        content = responses[status].get("content", {})
        return dict(next(iter(content.values()), {}).get("schema", {}))

    # Typed answers: no bare objects left (case, job, audit and health included).
    for path, methods in paths.items():
        for method, operation in methods.items():
            for status, answer in operation["responses"].items():
                for kind, body in answer.get("content", {}).items():
                    assert body.get("schema"), f"{method} {path} {status} {kind} has no schema"
                    assert body["schema"] != {"type": "object"}, f"{method} {path} untyped"
    assert ok_schema("/audit", "get")["items"] == {"$ref": "#/components/schemas/AuditRecordOut"}
    assert ok_schema("/health", "get") == {"$ref": "#/components/schemas/HealthOut"}
    assert ok_schema("/cases/{case_id}", "get") == {"$ref": "#/components/schemas/CaseOut"}
    assert ok_schema("/case-jobs/{job_id}", "get") == {"$ref": "#/components/schemas/JobOut"}
    # Constraints a client can check before sending.
    reason = schemas["SearchStart"]["properties"]["reason"]
    assert reason["minLength"] >= 10 and reason["maxLength"] >= reason["minLength"]
    assert schemas["SearchStart"]["properties"]["case"]["pattern"]
    # Refusals each operation may answer, in the one error shape or a richer one.
    enrol = paths[f"{API}/galleries/{{gallery}}/subjects"]["post"]["responses"]
    assert enrol["422"]["content"]["application/json"]["schema"]["$ref"].endswith("FacesFoundOut")
    assert enrol["409"]["content"]["application/json"]["schema"]["$ref"].endswith("DuplicateOut")
    assert "409" in paths[f"{API}/galleries"]["post"]["responses"]
    photo = paths[f"{API}/searches/{{search_id}}/photo"]["put"]["requestBody"]["content"]
    assert "image/jpeg" in photo and "image/png" in photo
