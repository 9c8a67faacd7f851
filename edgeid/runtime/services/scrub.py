"""Scrub: read every sealed file of the box and say which are damaged, writing nothing.

Each object (a gallery's records and thumbnail logs, its sealed search indexes, a case, the
audit chain, the accounts files, the proposals file) is read in full and authenticated; a
damaged one is reported with what is affected (counts and record ids, never content) and the
command that repairs it. Reading goes on past damage, as a repair would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from edgeid.runtime.accounts.sealing import existing_accounts_key
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import audit_dir, verify_chain
from edgeid.runtime.cases.repair import salvage_case
from edgeid.runtime.cases.store import CASES_DIR
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.gallery.records import ID_HEX
from edgeid.runtime.gallery.store import Gallery, GalleryStore
from edgeid.runtime.identity.device_key import DeviceKeyError, load_device_key
from edgeid.runtime.services.proposals import APPROVALS_KEY_SCOPE, ProposalStore
from edgeid.runtime.services.search_history import SEARCHES_KEY_SCOPE, SearchHistory
from edgeid.runtime.vault.errors import DecryptionError
from edgeid.runtime.vault.framed_log import ID_BYTES

INDEX_NAME = re.compile(r"index-(?P<model>.+)\.sealed")


@dataclass(frozen=True)
class Checked:
    """One object scrubbed: what it is, and what is wrong with it (None when it is OK)."""

    kind: str  # gallery, index, case, audit, accounts, proposals, search
    name: str  # ids and file names only
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def scrub(home: Path, galleries: GalleryStore) -> list[Checked]:
    """Every sealed object of the box, checked; the caller holds the galleries' lock."""
    checked: list[Checked] = []
    for gid in galleries.gallery_ids():
        checked += _gallery(galleries, gid)
    cases = Path(home) / CASES_DIR
    keyring = galleries.keyring
    if cases.is_dir():
        for directory in sorted(cases.iterdir()):
            if directory.is_dir() and ID_HEX.fullmatch(directory.name):
                checked.append(_case(directory, galleries))
    checked.append(_audit(home))
    key = existing_accounts_key(keyring)
    if key is not None:
        for kind, store in (("users", UserStore), ("tokens", TokenStore)):
            try:
                store(home, key).list()
                checked.append(Checked("accounts", kind))
            except (EdgeidError, OSError, ValueError) as exc:
                checked.append(Checked("accounts", kind, f"unreadable: {exc}"))
    if keyring.key_ids(APPROVALS_KEY_SCOPE):
        try:
            ProposalStore(home, keyring).all()
            checked.append(Checked("proposals", "proposals"))
        except (EdgeidError, OSError, ValueError) as exc:
            checked.append(Checked("proposals", "proposals", f"unreadable: {exc}"))
    if keyring.key_ids(SEARCHES_KEY_SCOPE):  # the age of a search does not matter here
        history = SearchHistory(home, keyring, keep=timedelta.max)
        for name, problem in history.check():
            checked.append(Checked("search", name, problem))
    return checked


def _gallery(galleries: GalleryStore, gid: str) -> list[Checked]:
    try:
        problem, gallery = galleries.check(gid)
    except (EdgeidError, OSError, ValueError) as exc:
        return [Checked("gallery", gid, f"nothing can be read: {exc}")]
    name = f"{gid} ({gallery.name})" if gallery.name else gid
    lost_thumbs = gallery.check_thumbnails()
    affected = []
    if gallery.lost_records:
        affected.append(f"lost records {', '.join(gallery.lost_records[:20])}")
    if gallery.lost_subjects:
        affected.append(f"{gallery.lost_subjects} subjects in damaged batches")
    if gallery.damaged_spans:
        affected.append(f"{gallery.damaged_spans} damaged stretch(es)")
    if lost_thumbs:
        affected.append(f"thumbnails of faces {', '.join(lost_thumbs[:20])}")
    if problem or affected:
        what = "; ".join(affected) or problem
        repair_ref = gallery.name or gid
        result = [Checked("gallery", name, f"{what}; run `edgeid gallery repair {repair_ref}`")]
    else:
        result = [Checked("gallery", name)]
    return result + _indexes(gallery)


def _indexes(gallery: Gallery) -> list[Checked]:
    """The sealed search indexes: authenticated under the gallery's key. One sealed under an
    older key is stale, not damaged: it is rebuilt from the store when next used."""
    checked = []
    for path in sorted(gallery.directory.glob("index-*.sealed")):
        match = INDEX_NAME.fullmatch(path.name)
        if match is None:
            continue
        name = f"{gallery.gallery_id}/{path.name}"
        try:
            blob = path.read_bytes()
            if blob[:ID_BYTES].hex() == gallery.key_id:
                gallery.open_blob(f"index:{match['model']}", blob)
            checked.append(Checked("index", name))
        except (DecryptionError, OSError):
            checked.append(
                Checked(
                    "index",
                    name,
                    "fails authentication; it is rebuilt from the gallery "
                    "when next used (derived data: nothing is lost)",
                )
            )
    return checked


def _case(directory: Path, galleries: GalleryStore) -> Checked:
    try:
        salvaged = salvage_case(directory, galleries.keyring)
    except (EdgeidError, OSError, ValueError) as exc:
        return Checked("case", directory.name, str(exc))
    if salvaged.clean:
        return Checked("case", directory.name)
    number = salvaged.meta.number if salvaged.meta else directory.name
    return Checked(
        "case",
        directory.name,
        f"{salvaged.summary()}; run `edgeid case repair {number}`",
    )


def _audit(home: Path) -> Checked:
    directory = audit_dir(home)
    if not directory.exists():
        return Checked("audit", "audit.log (none yet)")
    try:
        public_key = load_device_key(home).public_key()
    except DeviceKeyError:  # a box never provisioned: its chain has no key to check against
        return Checked("audit", "audit.log (not verified: no device key; run edgeid init)")
    report = verify_chain(directory, public_key)
    if report.ok:
        return Checked("audit", "audit.log")
    return Checked(
        "audit",
        "audit.log",
        f"{report.status.value} at record {report.first_bad_seq} ({report.reason}); keep it "
        "unchanged as evidence (edgeid audit verify)",
    )
