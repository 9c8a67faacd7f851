"""`edgeid approvals list|approve ID|reject ID`: the two-person rule at the shell.

Erasing a whole gallery, granting gallery access, making an admin and purging a case before its
retention date wait as proposals for a second person (see ``security.dual_control``). Here
the person at the box's shell, recorded as ``os:<login>``, decides them; nobody approves their
own proposal. Like the other commands that change the box, stop `edgeid serve` first.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

from edgeid.cli import EXIT_OK, emit
from edgeid.cli.options import Subparsers
from edgeid.runtime.accounts.sealing import accounts_key
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditLog
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.services.accounts import AccountAdmin
from edgeid.runtime.services.approvals import Approvals, Outcome
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.services.galleries import AccountableGalleries
from edgeid.runtime.services.models import ModelAdmin
from edgeid.runtime.services.proposals import Proposal, ProposalStore
from edgeid.runtime.vault.key_choice import provider_for


@contextmanager
def administration(home: Path, *, galleries: bool = False) -> Iterator[Approvals]:
    """The two-person rule over the box's accounts, audit log and proposals; ``galleries``
    also opens the galleries (with the face models) and the cases, to erase or purge."""
    settings = load_settings(home)
    with ExitStack() as stack:
        service: GalleryService | None = None
        if galleries:
            service = stack.enter_context(GalleryService.open(home, settings))
            store = service.store
        else:
            store = stack.enter_context(GalleryStore(home, provider_for(home, settings.keys)))
        log = stack.enter_context(AuditLog.open(home, store.keyring))
        recorder = Recorder(log)
        sealing = accounts_key(store.keyring)  # the galleries' lock is held: it may be made
        accounts = AccountAdmin(
            UserStore(home, sealing),
            TokenStore(home, sealing),
            recorder,
            gallery_names=lambda: [g.name for g in store.list_galleries()],
        )
        cases = None
        if service is not None:
            case_service = stack.enter_context(
                CaseService(home, service, log, detector=settings.inference.detector)
            )
            cases = AccountableCases(case_service, recorder)
        yield Approvals(
            ProposalStore(home, store.keyring),
            recorder,
            accounts,
            galleries=(
                AccountableGalleries(service, recorder, participants=[cases] if cases else ())
                if service
                else None
            ),
            cases=cases,
            models=ModelAdmin(models_dir(home), recorder),
            dual_control=settings.security.dual_control,
            ttl=timedelta(days=settings.security.proposal_ttl_days),
        )


def proposal_json(proposal: Proposal, ttl: timedelta) -> dict[str, object]:
    return {
        **proposal.to_json(),
        "summary": proposal.summary(),
        "expires_at": proposal.expires_at(ttl).isoformat(),
    }


def outcome_json(outcome: Outcome, ttl: timedelta) -> dict[str, object]:
    return {
        "kind": outcome.kind.value,
        "summary": outcome.summary,
        "done": outcome.done,
        "proposal": proposal_json(outcome.proposal, ttl) if outcome.proposal else None,
        "one_time_password": outcome.one_time_password,
    }


def outcome_text(outcome: Outcome) -> str:
    """What a command that asked for a covered change prints."""
    if outcome.done or outcome.proposal is None:
        return f"done: {outcome.summary}"
    pid = outcome.proposal.proposal_id
    return (
        f"proposal {pid}: {outcome.summary}; waits for a second person's approval "
        f"(edgeid approvals approve {pid}, or the Approvals page)"
    )


def list_proposals(args: argparse.Namespace) -> int:
    with administration(args.home_dir) as approvals:
        waiting = approvals.pending(LocalOperator.current())
        now, ttl = approvals.now(), approvals.ttl
    lines = [
        f"{p.proposal_id}\t{p.summary()}\tby {p.proposer}\t"
        f"{int((now - p.created_at).total_seconds() // 3600)} h old\treason: {p.reason}"
        for p in waiting
    ]
    emit(args, [proposal_json(p, ttl) for p in waiting], "\n".join(lines) or "nothing waits")
    return EXIT_OK


def approve(args: argparse.Namespace) -> int:
    with administration(args.home_dir, galleries=True) as approvals:
        outcome = approvals.approve(LocalOperator.current(), args.id, where="cli approvals approve")
        ttl = approvals.ttl
    text = f"approved proposal {args.id}: {outcome.summary}; done"
    payload = outcome_json(outcome, ttl)
    if outcome.model_changed:
        from edgeid.cli.commands.models_cmd import re_embed_all

        counts = re_embed_all(args.home_dir, quiet=args.json)
        payload["re_embedded"] = counts
        text += f"; re-embedded {sum(counts.values())} faces in {len(counts)} galleries"
    if outcome.user is not None and outcome.one_time_password:
        text += (
            f"\none-time password for {outcome.user.username} (shown once, must be changed "
            f"at first sign-in): {outcome.one_time_password}"
        )
    emit(args, payload, text)
    return EXIT_OK


def reject(args: argparse.Namespace) -> int:
    with administration(args.home_dir) as approvals:
        proposal = approvals.reject(LocalOperator.current(), args.id, where="cli approvals reject")
        ttl = approvals.ttl
    emit(args, proposal_json(proposal, ttl), f"rejected proposal {args.id}: {proposal.summary()}")
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    approvals = sub.add_parser(
        "approvals", help="the two-person rule: decide proposals (stop edgeid serve first)"
    )
    actions = approvals.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")

    p = actions.add_parser("list", parents=[common], help="proposals waiting for approval")
    p.set_defaults(handler=list_proposals)

    p = actions.add_parser(
        "approve", parents=[common], help="approve another person's proposal; it runs at once"
    )
    p.add_argument("id", help="the proposal's id (edgeid approvals list)")
    p.set_defaults(handler=approve)

    p = actions.add_parser("reject", parents=[common], help="reject (or withdraw) a proposal")
    p.add_argument("id", help="the proposal's id (edgeid approvals list)")
    p.set_defaults(handler=reject)
