"""What an admin does to galleries from the pages and the API, recorded in the audit log.

Users are changed through ``edgeid.runtime.services.accounts`` (and ``user_requests``); erasing a
gallery goes through the two-person rule (``edgeid.runtime.services.approvals``).
"""

from __future__ import annotations

import re

from edgeid.runtime.audit import AuditAction
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.records import GalleryInfo
from edgeid.runtime.web.audit_trail import record
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState

# Gallery names appear in page paths and API URLs: no slashes or other characters that would
# need more than percent-encoding of a space.
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


def create_gallery(
    state: WebState, principal: Principal, name: str, description: str
) -> GalleryInfo:
    name = name.strip()
    if not GALLERY_NAME.fullmatch(name):
        raise BadInputError(
            "a gallery name is 1-64 letters, digits, spaces, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    info = state.galleries.create_gallery(name, description.strip())
    record(state, principal, AuditAction.GALLERY_CREATED, gallery=info.name)
    return info
