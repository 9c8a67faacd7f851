"""Accountability at the command line: every `edgeid` command is classified, like every web
route in test_every_door.py, and each one that reveals or changes personal data names the test
that runs it and checks its one audit record (actor ``os:<login>``, its case and reason).

A command added without a class fails ``test_every_command_is_classified``; a class that
points at a test which does not exist fails ``test_every_proof_exists``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeid.cli import build_parser
from edgeid.runtime.audit import AuditAction

REVEALS, CHANGES, NEITHER = "reveals", "changes", "neither"
ERASES_THE_LOG = "erases everything, the audit log included"


@dataclass(frozen=True)
class Command:
    kind: str
    action: AuditAction | None = None
    proof: str | None = None  # "module::test" or "module::TABLE[id]" that runs and checks it
    why: str = ""


CLI = "test_cli_accountability"
APPROVALS = "test_approvals"
COMMANDS: dict[str, Command] = {
    # Technicians' tools that touch no personal data (models, images they pass, the box)
    "models build": Command(NEITHER, why="converts shipped weights"),
    "models list": Command(NEITHER),
    "models verify": Command(NEITHER),
    "models add": Command(NEITHER, why="an operator's model file and its manifest"),
    "models calibrate": Command(
        NEITHER, why="the operator's labelled images in, thresholds out; no gallery data"
    ),
    "models use": Command(
        CHANGES,
        AuditAction.MODEL_CHANGED,
        "test_operator_models::"
        "test_with_dual_control_off_use_switches_and_re_embeds_and_search_finds_the_mate",
    ),
    "detect": Command(NEITHER, why="boxes in an image the technician passes; no gallery read"),
    "embed": Command(NEITHER, why="the same, with templates of that image only"),
    "eval lfw": Command(NEITHER, why="public benchmark images"),
    "eval ident": Command(
        NEITHER,
        why="labelled images the technician passes, searched in a temporary gallery that is "
        "removed afterwards; no gallery of the box is read",
    ),
    "bench pipeline": Command(NEITHER),
    "bench search": Command(NEITHER, why="synthetic templates"),
    "serve": Command(NEITHER, why="its doors are the web routes, each classified"),
    "telemetry once": Command(NEITHER, why="health figures only"),
    "telemetry run": Command(NEITHER, why="health figures only"),
    "fleet serve": Command(NEITHER),
    "cluster head": Command(
        NEITHER, why="starts this box's Ray node; the ingest it serves is `case ingest`'s"
    ),
    "cluster worker": Command(
        NEITHER, why="a node that analyses image bytes it is sent; holds no keys, names, cases"
    ),
    "provision init": Command(NEITHER, why="identity, keys, settings, models"),
    "provision selftest": Command(NEITHER),
    "provision status": Command(NEITHER),
    "provision factory-reset": Command(ERASES_THE_LOG, why="crypto-erases the whole box"),
    "provision rotate-keys": Command(
        CHANGES,
        AuditAction.KEYS_ROTATED,
        "test_provision_keys::test_rotate_keys_is_recorded_in_the_audit_log_as_the_os_user",
    ),
    "update keygen": Command(NEITHER),
    "update build": Command(NEITHER),
    "update sign": Command(NEITHER),
    "update verify": Command(NEITHER),
    "update install": Command(NEITHER),
    "update commit": Command(NEITHER),
    "update rollback": Command(NEITHER),
    "update status": Command(NEITHER),
    "update resume": Command(NEITHER),
    "update trust": Command(NEITHER),
    # Accounts
    "init": Command(
        CHANGES,
        AuditAction.USER_CREATED,
        "test_web_cli::test_init_makes_the_first_admin_a_certificate_and_the_audit_log_once",
    ),
    "users list": Command(NEITHER, why="staff user names and roles"),
    "users tokens": Command(NEITHER, why="token ids and labels"),
    "users add": Command(
        CHANGES, AuditAction.USER_CREATED, f"{CLI}::test_users_changes_are_recorded_as_the_os_user"
    ),
    "users reset-password": Command(
        CHANGES,
        AuditAction.PASSWORD_CHANGED,
        f"{CLI}::test_users_changes_are_recorded_as_the_os_user",
    ),
    "users set": Command(
        CHANGES,
        AuditAction.USER_DISABLED,
        "test_web_cli::test_users_command_changes_users_and_tokens_and_records_each_change",
    ),
    "users token-add": Command(
        CHANGES,
        AuditAction.TOKEN_CREATED,
        "test_web_cli::test_users_command_changes_users_and_tokens_and_records_each_change",
    ),
    "users token-revoke": Command(
        CHANGES,
        AuditAction.TOKEN_REVOKED,
        "test_web_cli::test_users_command_changes_users_and_tokens_and_records_each_change",
    ),
    "approvals list": Command(NEITHER, why="what waits: kinds, proposers, reasons"),
    "approvals approve": Command(
        CHANGES,
        AuditAction.CHANGE_APPROVED,
        f"{APPROVALS}::test_the_shell_approves_a_web_users_proposal",
    ),
    "approvals reject": Command(
        CHANGES,
        AuditAction.CHANGE_REJECTED,
        f"{APPROVALS}::test_the_shell_proposes_and_cannot_approve_its_own_proposal",
    ),
    # Galleries
    "gallery create": Command(CHANGES, AuditAction.GALLERY_CREATED, f"{CLI}::ONE_RECORD[create]"),
    "gallery list": Command(
        NEITHER,
        why="gallery names and counts",
        proof=f"{CLI}::test_what_reveals_only_names_and_counts_is_not_recorded",
    ),
    "gallery subjects": Command(
        REVEALS, AuditAction.SUBJECTS_LISTED, f"{CLI}::ONE_RECORD[subjects]"
    ),
    "gallery enroll": Command(CHANGES, AuditAction.ENROLL, f"{CLI}::ONE_RECORD[enroll]"),
    "gallery add-photo": Command(CHANGES, AuditAction.FACE_ADDED, f"{CLI}::ONE_RECORD[add-photo]"),
    "gallery edit": Command(CHANGES, AuditAction.SUBJECT_EDITED, f"{CLI}::ONE_RECORD[edit]"),
    "gallery search": Command(
        REVEALS,
        AuditAction.SEARCH,
        f"{CLI}::test_a_search_is_recorded_as_the_os_user_and_audit_export_by_case_shows_it",
    ),
    "gallery verify": Command(REVEALS, AuditAction.VERIFY, f"{CLI}::ONE_RECORD[verify]"),
    "gallery delete": Command(
        CHANGES, AuditAction.DELETE_SUBJECT, f"{CLI}::ONE_RECORD[delete-subject]"
    ),
    "gallery export": Command(REVEALS, AuditAction.GALLERY_EXPORTED, f"{CLI}::ONE_RECORD[export]"),
    "gallery import": Command(CHANGES, AuditAction.GALLERY_IMPORTED, f"{CLI}::ONE_RECORD[import]"),
    "gallery repair": Command(
        CHANGES,
        AuditAction.STORE_REPAIRED,
        "test_damage_contained::test_finding_5_gallery_repair_keeps_every_intact_batch_and_is_recorded",
    ),
    "gallery rotate-key": Command(
        CHANGES, AuditAction.KEYS_ROTATED, f"{CLI}::ONE_RECORD[rotate-key]"
    ),
    "gallery re-embed": Command(
        CHANGES, AuditAction.GALLERY_RE_EMBEDDED, f"{CLI}::ONE_RECORD[re-embed]"
    ),
    # Oversight
    "audit verify": Command(NEITHER, why="counts and sequence numbers only"),
    "audit export": Command(
        REVEALS, AuditAction.AUDIT_EXPORTED, f"{CLI}::ONE_RECORD[audit-export]"
    ),
    "scrub": Command(NEITHER, why="object kinds, ids, file names and counts; no content"),
    # Cases
    "case ingest": Command(
        CHANGES,
        AuditAction.CASE_INGESTED,
        f"{CLI}::test_case_ingest_is_recorded_before_its_searches_and_as_the_os_user",
    ),
    "case list": Command(NEITHER, why="case numbers and counts"),
    "case show": Command(
        REVEALS,
        AuditAction.CASE_VIEWED,
        f"{CLI}::test_case_show_report_and_purge_each_write_one_record",
    ),
    "case report": Command(
        REVEALS,
        AuditAction.CASE_REPORT,
        f"{CLI}::test_case_show_report_and_purge_each_write_one_record",
    ),
    "case repair": Command(
        CHANGES,
        AuditAction.STORE_REPAIRED,
        "test_damage_contained::test_finding_6_case_repair_keeps_what_authenticates_and_is_recorded",
    ),
    "case purge": Command(
        CHANGES,
        AuditAction.CASE_PURGED,
        f"{CLI}::test_purging_expired_cases_records_each_with_the_reason",
    ),
}


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(prefix)
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*prefix, name))


def test_every_command_is_classified() -> None:
    commands = set(leaf_commands(build_parser([])))
    assert not commands - COMMANDS.keys(), f"classify: {sorted(commands - COMMANDS.keys())}"
    assert not COMMANDS.keys() - commands, f"stale: {sorted(COMMANDS.keys() - commands)}"


@pytest.mark.parametrize(
    "command", sorted(c for c, k in COMMANDS.items() if k.kind in (REVEALS, CHANGES))
)
def test_every_proof_exists(command: str) -> None:
    """Each revealing or changing command points at a test that runs it and checks its
    record; that test must exist (a parametrised table row counts, by its id)."""
    door = COMMANDS[command]
    assert door.action is not None and door.proof, f"{command}: no action or proof"
    module_name, _, target = door.proof.partition("::")
    module = importlib.import_module(module_name)
    if "[" in target:
        table, row = target.rstrip("]").split("[")
        ids = [entry[0] for entry in getattr(module, table)]
        assert row in ids, f"{command}: no row {row!r} in {module_name}.{table}"
        actions = {entry[0]: entry[-1] for entry in getattr(module, table)}
        assert actions[row] is door.action, f"{command}: the row checks {actions[row]}"
    else:
        assert callable(getattr(module, target, None)), f"{command}: no test {door.proof}"


# -- every action is produced by some path ------------------------------------------------------
# Actions no door above classifies: where a test produces and checks each.
ELSEWHERE: dict[AuditAction, str] = {
    AuditAction.LOGIN_FAILED: (
        "test_web_security::test_a_wrong_password_past_the_free_ones_delays_that_pair_even_if_right"
    ),
    AuditAction.ACCESS_DENIED: (
        "test_services_accountable::test_refusals_are_recorded_then_rate_limited_and_counted"
    ),
    AuditAction.DUPLICATE_FOUND: (
        "test_services_accountable::test_a_duplicate_warning_is_recorded_since_it_shows_who_matched"
    ),
    AuditAction.OPERATION_FAILED: (
        "test_services_accountable::test_an_erasure_is_recorded_first_and_a_failure_after_it_too"
    ),
    AuditAction.LOG_RECOVERED: "test_audit_log::test_a_torn_tail_is_cut_and_the_recovery_recorded",
    AuditAction.USER_ENABLED: (
        "test_approvals::test_user_changes_are_recorded_under_their_own_labels"
    ),
    AuditAction.GALLERY_ACCESS_CHANGED: (
        "test_approvals::test_user_changes_are_recorded_under_their_own_labels"
    ),
    AuditAction.CASE_PURGED: f"{CLI}::test_purging_expired_cases_records_each_with_the_reason",
}


def test_every_action_is_produced_by_some_path() -> None:
    """The one enum of actions: each (but the legacy names old logs still hold) is written by
    a classified door or by a named test's path; none is dead."""
    from test_every_door import WEB_DOORS

    from edgeid.runtime.audit.events import LEGACY_ACTIONS

    produced = {a for door in WEB_DOORS.values() for a in door.actions}
    produced |= {c.action for c in COMMANDS.values() if c.action is not None}
    produced |= ELSEWHERE.keys()
    missing = set(AuditAction) - LEGACY_ACTIONS - produced
    assert not missing, f"no path produces {sorted(a.value for a in missing)}"
    for action, proof in ELSEWHERE.items():
        module_name, _, name = proof.partition("::")
        source = importlib.import_module(module_name)
        assert callable(getattr(source, name, None)), f"{action}: no test {proof}"
        assert f"AuditAction.{action.name}" in Path(source.__file__ or "").read_text(), (
            f"{proof} does not check {action}"
        )
