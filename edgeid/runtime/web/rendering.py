"""Server-rendered pages: one Jinja environment (autoescaped), one ``render`` for every page."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
from starlette.requests import Request
from starlette.responses import HTMLResponse

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.compat import UTC
from edgeid.runtime.display import visible_bidi
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import web_state

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
FLASH_KEY = "flash"

# The navigation: (permission, path, label), shown to those who hold the permission.
NAVIGATION: tuple[tuple[Permission, str, str], ...] = (
    (Permission.SEARCH, "/search", "Search"),
    (Permission.SEARCH, "/searches", "My searches"),
    (Permission.SEARCH, "/cases", "Cases"),
    (Permission.ENROL, "/enrol", "Enrol"),
    (Permission.SUBJECTS_READ, "/galleries", "Subjects"),
    (Permission.AUDIT_READ, "/audit", "Audit"),
    (Permission.RETENTION, "/retention", "Retention"),
    (Permission.USERS, "/admin/users", "Users"),
    (Permission.GALLERIES, "/admin/galleries", "Galleries"),
    (Permission.SETTINGS, "/admin/settings", "Settings"),
    (Permission.APPROVALS, "/approvals", "Approvals"),
    (Permission.HEALTH, "/health", "Health"),
)


def _shown(value: Any) -> Any:
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return visible_bidi(value)
    return value


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # Every value a page shows, before escaping: Unicode direction marks are shown as
        # ⟨U+202E⟩, never obeyed, so a file name or display name cannot disguise itself.
        finalize=_shown,
    )
    env.filters["visible"] = lambda value: visible_bidi(str(value))
    env.filters["pct"] = lambda value: "not measured" if value is None else f"{value:.0%}"
    env.filters["score"] = lambda value: f"{value:.3f}"
    env.filters["sentence"] = sentence
    env.filters["full_stop"] = full_stop
    env.filters["day"] = display_day
    env.filters["moment"] = display_moment
    return env


# One date format on every page, in every date field and in every message: year-month-day
# (ISO 8601), the order the date fields ask for (see _date_field.html), never the browser's
# locale order (a picker's mm/dd/yyyy beside a table's 2027-01-31 invites misreading).
DAY_FORMAT = "%Y-%m-%d"


def display_day(value: date | datetime | None) -> str:
    return value.strftime(DAY_FORMAT) if value is not None else ""


def display_moment(value: datetime | None) -> str:
    """A time on one line, in UTC, to the minute."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime(f"{DAY_FORMAT}\u00a0%H:%M\u00a0UTC")


# The context values every page shows as its error: the core's messages are written as
# clauses ("the photo is damaged ...; use a complete copy") so that the CLI can prefix them;
# a page ends them with a full stop, and its stylesheet capitalises their first letter
# (p.error::first-letter), so the text stays the core's for whoever searches for it.
SENTENCE_KEYS = ("error", "message")


def full_stop(text: str) -> str:
    text = text.rstrip()
    return text if not text or text[-1] in ".!?" else text + "."


def sentence(text: str) -> str:
    """``text`` as a sentence: a capital first letter and a closing full stop."""
    text = text.strip()
    if not text:
        return text
    if text[0].islower():
        text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def flash(principal: Principal, message: str) -> None:
    """A one-line message for the next page this session sees."""
    if principal.session is not None:
        principal.session.values[FLASH_KEY] = message


def render(
    request: Request,
    template: str,
    *,
    principal: Principal | None = None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    state = web_state(request)
    session = principal.session if principal else None
    message = session.values.pop(FLASH_KEY, None) if session else None
    nav = [
        (path, label)
        for permission, path, label in NAVIGATION
        if principal is not None and principal.may(permission)
    ]
    anonymous_csrf = context.pop("csrf_token", "")
    for key in SENTENCE_KEYS:
        if isinstance(context.get(key), str):
            context[key] = full_stop(context[key])
    html = state.templates.get_template(template).render(
        request_path=request.url.path,
        principal=principal,
        csrf_token=session.csrf if session else anonymous_csrf,
        nav=nav,
        flash=message,
        version=state.version,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)
