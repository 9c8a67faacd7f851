"""Schemathesis against the live ``/api/v1`` over its own OpenAPI document: with an
investigator's and an admin's token, generated requests get no server error, no status the
document does not name for that operation, no response outside its schema and no content type
other than the documented one.

A bounded number of examples per operation (derandomized) keeps it to well under a minute on
top of the box; a failure names the operation and a curl line to reproduce it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from web_support import WORK_HEADERS, Box, build_box, free_port, serving, tls_settings

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.tokens import TokenStore

API = "/api/v1"
EXAMPLES_PER_OPERATION = 6
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


def token(box: Box, role: Role) -> str:
    held = ROLE_PERMISSIONS[role]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[role], f"schema {role.value}", held, allowed=held
    )
    return secret


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path
) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("schema")
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        tokens = {role: token(box, role) for role in ROLES}
        with serving(box.app, box.settings, free_port()) as url:
            yield Served(box, url, tokens)
    finally:
        box.close()


@pytest.fixture(scope="module")
def api_schema(served: Served) -> schemathesis.BaseSchema:
    document = httpx.get(f"{served.url}{API}/openapi.json", verify=False, timeout=30).json()
    return schemathesis.openapi.from_dict(document)


def test_api_keeps_to_its_document(api_schema: schemathesis.BaseSchema, served: Served) -> None:
    failures = []
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
            for role in ROLES:
                headers = {"Authorization": f"Bearer {served.tokens[role]}", **WORK_HEADERS}
                case.call_and_validate(
                    base_url=served.url, headers=headers, checks=CHECKS, verify=False, timeout=60
                )

        try:
            calls()
        except Exception as exc:  # every operation's failure, not only the first
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
