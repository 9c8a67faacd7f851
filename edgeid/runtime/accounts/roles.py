"""Roles and what each may do.

Every web page and API endpoint names one ``Permission``; a role is a fixed set of them, and an
API token carries a subset (its scopes) of its owner's. Only investigators hold the permissions
that show faces or names of enrolled people; technicians and admins never see a face.
"""

from __future__ import annotations

from edgeid.runtime.compat import StrEnum
from edgeid.runtime.errors import BadInputError


class Role(StrEnum):
    INVESTIGATOR = "investigator"  # search, review results, enrol
    SUPERVISOR = "supervisor"  # audit, retention, exports
    ADMIN = "admin"  # users, galleries, settings
    TECHNICIAN = "technician"  # health, models, updates; no access to faces


class Permission(StrEnum):
    SEARCH = "search"  # run a search, see its candidates, record lead decisions
    ENROL = "enrol"  # enrol a subject (quality gate and duplicate check)
    SUBJECTS_READ = "subjects:read"  # subject pages and enrolment photos
    SUBJECTS_DELETE = "subjects:delete"  # erase a subject
    AUDIT_READ = "audit:read"  # the audit page and its export
    RETENTION = "retention"  # erase subjects past their retention date, in any gallery
    USERS = "users"  # users, their roles and galleries, anyone's tokens
    GALLERIES = "galleries"  # create and delete galleries
    SETTINGS = "settings"  # read the box's settings
    HEALTH = "health"  # health page, models and versions
    # Approve or reject another person's proposal under the two-person rule (erasing a
    # gallery, granting gallery access, making an admin, purging a case early).
    APPROVALS = "approvals"
    # Open any case on the box, not only one's own: held by no role, only by the operator at
    # the box's shell (``edgeid.runtime.services.caller.LocalOperator``).
    CASES_ANY = "cases:any"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.INVESTIGATOR: frozenset(
        {
            Permission.SEARCH,
            Permission.ENROL,
            Permission.SUBJECTS_READ,
            Permission.SUBJECTS_DELETE,
        }
    ),
    Role.SUPERVISOR: frozenset({Permission.AUDIT_READ, Permission.RETENTION, Permission.APPROVALS}),
    Role.ADMIN: frozenset(
        {Permission.USERS, Permission.GALLERIES, Permission.SETTINGS, Permission.APPROVALS}
    ),
    Role.TECHNICIAN: frozenset({Permission.HEALTH}),
}

# What each role does, in words, for the admin choosing one (never the raw permissions).
ROLE_DESCRIPTIONS: dict[Role, str] = {
    Role.INVESTIGATOR: (
        "Searches faces, brings in a case's seized media, enrols and erases subjects; only in "
        "the galleries given to them."
    ),
    Role.SUPERVISOR: (
        "Reads and exports the audit log, erases subjects past their retention date, and "
        "approves or rejects changes that need a second person. Sees no face."
    ),
    Role.ADMIN: (
        "Adds users and sets their role and galleries, creates and erases galleries, reads the "
        "settings, and approves changes that need a second person. Sees no face or name."
    ),
    Role.TECHNICIAN: ("Checks the box's health, models and versions. Sees no face, name or case."),
}

# Permissions that work on a gallery's content: limited to the galleries a user is given.
GALLERY_SCOPED: frozenset[Permission] = frozenset(
    {Permission.SEARCH, Permission.ENROL, Permission.SUBJECTS_READ, Permission.SUBJECTS_DELETE}
)


def permissions_of(role: Role) -> frozenset[Permission]:
    return ROLE_PERMISSIONS[role]


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise BadInputError(f"unknown role {value!r}; choose one of {choices}") from None


def parse_permissions(values: list[str] | tuple[str, ...]) -> frozenset[Permission]:
    out: set[Permission] = set()
    for value in values:
        try:
            out.add(Permission(value))
        except ValueError:
            choices = ", ".join(p.value for p in Permission)
            raise BadInputError(f"unknown scope {value!r}; choose from {choices}") from None
    return frozenset(out)
