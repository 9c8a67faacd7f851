"""The sealed accounts files: known-answer vectors, refusals, the migration from the
plaintext files of the previous version, the key's life in the keyring (rotation, gallery
recovery, factory reset), on real files and real crypto. No face models needed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from accounts_vectors import (
    KEY_ID,
    PASSWORDS,
    TOKENS,
    USERS,
    VECTORS_DIR,
    fixed_random,
    generate,
    key,
)
from test_gallery_store import _hits, _text_needles

from edgeid.cli import EXIT_FAILED, EXIT_OK, main
from edgeid.cli.commands.users_cmd import reading_key
from edgeid.runtime.accounts.files import AccountsFileError
from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.sealing import (
    ACCOUNTS_KEY_SCOPE,
    AccountsKey,
    accounts_key,
    existing_accounts_key,
    seal_file,
)
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault.keys import KeyFileProvider, Keyring

EXPECTED: dict[str, str | None] = json.loads((VECTORS_DIR / "expected.json").read_text())
CANARY_USER = "quillon.canary"
CANARY_GALLERY = "Marrowbyte Canary Gallery"
CANARY_LABEL = "periwinkle canary script"


def _home_with(tmp_path: Path, **files: bytes) -> Path:
    """A state directory whose accounts folder holds ``files`` (name -> bytes)."""
    home = tmp_path / "home"
    folder = home / "accounts"
    folder.mkdir(parents=True, mode=0o700)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        os.chmod(folder / name, 0o600)
    return home


def _needles(*texts: str) -> dict[str, bytes]:
    return {f"{t[:8]} {k}": v for t in texts for k, v in _text_needles(t).items()}


# -- known answers ---------------------------------------------------------------------------


def test_vectors_match_their_generator(tmp_path: Path) -> None:
    """The committed vectors are exactly what tests/accounts_vectors.py writes."""
    generate(tmp_path)
    committed = sorted(p.name for p in VECTORS_DIR.iterdir() if p.suffix == ".json")
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (VECTORS_DIR / name).read_bytes(), name


def test_known_answer_files_open_and_reseal_to_the_same_bytes(tmp_path: Path) -> None:
    users_bytes = (VECTORS_DIR / "users.json").read_bytes()
    tokens_bytes = (VECTORS_DIR / "tokens.json").read_bytes()
    assert seal_file(key(), "users", USERS, random=fixed_random()) == users_bytes
    assert seal_file(key(), "tokens", TOKENS, random=fixed_random()) == tokens_bytes
    for needle in _needles("vera.vector", "otto.vector", "Vector Gallery Ω").values():
        assert needle not in users_bytes and needle not in tokens_bytes

    home = _home_with(tmp_path, **{"users.json": users_bytes, "tokens.json": tokens_bytes})
    users = UserStore(home, key())
    assert [u.to_json() for u in users.list()] == [USERS["otto.vector"], USERS["vera.vector"]]
    for name, password in PASSWORDS.items():
        assert users.authenticate(name, password) is not None
    assert users.require("otto.vector").galleries == ("Vector Gallery Ω",)
    (token,) = TokenStore(home, key()).list("otto.vector")
    assert token.to_json() == TOKENS["00112233445566ff"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_users_vector_opens_or_is_one_clear_error_naming_the_file(
    name: str, tmp_path: Path
) -> None:
    home = _home_with(tmp_path, **{"users.json": (VECTORS_DIR / f"{name}.json").read_bytes()})
    path = home / "accounts" / "users.json"
    error = EXPECTED[name]
    if error is None:
        assert sorted(u.username for u in UserStore(home, key()).list()) == sorted(USERS)
        return
    with pytest.raises(AccountsFileError) as caught:
        UserStore(home, key()).list()
    assert error in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_damaged_file_is_one_line_from_the_cli_not_a_traceback(tmp_path: Path) -> None:
    home = tmp_path / "box"
    assert _cli("init", "--home", str(home))[0] == EXIT_OK
    path = home / "accounts" / "users.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = _cli("users", "list", "--home", str(home))
    assert code == EXIT_FAILED
    assert err.startswith("edgeid: error: ") and err.count("\n") == 1 and str(path) in err


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# -- what the files hold -----------------------------------------------------------------------


def test_no_name_label_or_gallery_is_in_clear_and_lookups_differ_by_file(tmp_path: Path) -> None:
    accounts = key()
    users = UserStore(tmp_path, accounts)
    _, once = users.create(CANARY_USER, Role.INVESTIGATOR, galleries=[CANARY_GALLERY])
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    token, secret = TokenStore(tmp_path, accounts).create(
        CANARY_USER, CANARY_LABEL, held, allowed=held
    )
    assert not _hits(tmp_path, _needles(CANARY_USER, CANARY_GALLERY, CANARY_LABEL, once, secret))
    assert not _hits(tmp_path, {"argon2": b"$argon2id$", "digest": token.secret_sha256.encode()})
    folder = tmp_path / "accounts"
    for name in ("users.json", "tokens.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert accounts.lookup("users", "x") != accounts.lookup("tokens", "x")
    other = AccountsKey.derive(KEY_ID, bytes(32))
    assert accounts.lookup("users", "x") != other.lookup("users", "x")  # keyed, not a plain hash
    with pytest.raises(AccountsFileError, match="does not open"):
        UserStore(tmp_path, other).list()  # the same key id, another key


def test_two_processes_see_each_others_changes(tmp_path: Path) -> None:
    one, two = UserStore(tmp_path, key()), UserStore(tmp_path, key())
    one.create("alice", Role.ADMIN)
    assert two.get("alice") is not None
    two.create("bob", Role.TECHNICIAN)
    assert [u.username for u in one.list()] == ["alice", "bob"]
    one.update("bob", disabled=True)
    assert two.require("bob").disabled


# -- migration from the plaintext files ------------------------------------------------------


def _legacy(list_key: str, items: dict[str, dict[str, object]]) -> bytes:
    """A file as the previous version wrote it (edgeid/runtime/accounts/files.py write_json)."""
    body = {"version": 1, list_key: list(items.values())}
    return json.dumps(body, indent=1, sort_keys=True).encode("utf-8")


@contextlib.contextmanager
def _watching(path: Path) -> Iterator[int]:
    """A descriptor on the file's current inode: what is read through it after a migration is
    what stays in those disk blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _left_in(fd: int) -> bytes:
    return os.pread(fd, 1 << 20, 0)


def test_plaintext_files_are_sealed_on_first_open_and_their_bytes_overwritten(
    tmp_path: Path,
) -> None:
    users = {n: {**u, "galleries": [CANARY_GALLERY]} for n, u in USERS.items()}
    tokens = {t: {**v, "name": CANARY_LABEL} for t, v in TOKENS.items()}
    home = _home_with(
        tmp_path,
        **{"users.json": _legacy("users", users), "tokens.json": _legacy("tokens", tokens)},
    )
    folder = home / "accounts"
    needles = _needles(*users, CANARY_GALLERY, CANARY_LABEL)
    assert _hits(home, needles), "the test must find the plaintext before the migration"
    with _watching(folder / "users.json") as old_users, _watching(folder / "tokens.json") as old:
        user_store = UserStore(home, key())
        token_store = TokenStore(home, key())
        assert not _hits(home, needles)
        assert sorted(os.listdir(folder)) == [".lock", "tokens.json", "users.json"]
        for fd in (old_users, old):
            left = _left_in(fd)
            assert left and left == bytes(len(left)), "the plaintext inode was not zero-filled"
    assert [u.to_json() for u in user_store.list()] == [users["otto.vector"], users["vera.vector"]]
    assert token_store.get("00112233445566ff").to_json() == tokens["00112233445566ff"]
    assert json.loads((folder / "users.json").read_bytes())["format"] == "edgeid-accounts"
    for name, password in PASSWORDS.items():
        assert UserStore(home, key()).authenticate(name, password) is not None


def test_a_migration_cut_short_is_finished_on_the_next_open(tmp_path: Path) -> None:
    # Cut before the sealed file replaced the plaintext: a second name for the same inode.
    home = _home_with(tmp_path, **{"users.json": _legacy("users", USERS)})
    folder = home / "accounts"
    os.link(folder / "users.json", folder / "users.json.plaintext")
    with _watching(folder / "users.json") as fd:
        assert len(UserStore(home, key()).list()) == 2
        assert not _left_in(fd).strip(b"\0")
    assert not (folder / "users.json.plaintext").exists()

    # Cut after: the sealed file is in place, the old plaintext still under its second name.
    (folder / "users.json.plaintext").write_bytes(_legacy("users", USERS))
    with _watching(folder / "users.json.plaintext") as fd:
        assert len(UserStore(home, key()).list()) == 2
        assert not _left_in(fd).strip(b"\0")
    assert sorted(os.listdir(folder)) == [".lock", "users.json"]
    assert not _hits(home, _needles(*USERS))


# -- the key in the keyring ----------------------------------------------------------------


def test_the_accounts_key_survives_rotation_and_gallery_recovery(tmp_path: Path) -> None:
    with GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as store:
        store.create_gallery("office")
        made = accounts_key(store.keyring)
        assert accounts_key(store.keyring) == made  # one key, made once
        assert store.keyring.key_ids(ACCOUNTS_KEY_SCOPE) == [made.key_id]
        assert ACCOUNTS_KEY_SCOPE not in store.keyring.gallery_ids()
        _, once = UserStore(tmp_path, made).create(CANARY_USER, Role.ADMIN)
        store.rotate_kek(KeyFileProvider(tmp_path / "keys"))
    # Reopened: gallery recovery ran, the KEK is the new one, the accounts file still opens.
    with GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as store:
        assert existing_accounts_key(store.keyring) == made
        assert [g.name for g in store.list_galleries()] == ["office"]
    ring = Keyring.open(tmp_path / "galleries" / "keyring.json", KeyFileProvider(tmp_path / "keys"))
    assert UserStore(tmp_path, existing_accounts_key(ring) or made).authenticate(CANARY_USER, once)


def test_reading_beside_the_service_never_writes_the_keyring(tmp_path: Path) -> None:
    home = tmp_path / "box"
    assert _cli("init", "--home", str(home))[0] == EXIT_OK
    keyring = home / "galleries" / "keyring.json"
    before = keyring.read_bytes()
    with GalleryStore(home, KeyFileProvider(home / "keys")):  # as edgeid serve holds it
        assert UserStore(home, reading_key(home)).get("admin") is not None
        code, out, err = _cli("users", "list", "--home", str(home))
        assert code == EXIT_OK and out.startswith("admin\t"), err
    assert keyring.read_bytes() == before


def test_an_upgraded_box_gets_its_accounts_key_and_its_files_sealed(tmp_path: Path) -> None:
    """A box of the previous version: a keyring without the accounts scope, plaintext users."""
    home = tmp_path / "box"
    assert _cli("init", "--home", str(home))[0] == EXIT_OK
    with GalleryStore(home, KeyFileProvider(home / "keys")) as store:
        store.keyring.retain_only(ACCOUNTS_KEY_SCOPE, [])
    shutil.copy(VECTORS_DIR / "users-v1-plaintext.json", home / "accounts" / "users.json")
    code, out, err = _cli("users", "list", "--home", str(home))
    assert code == EXIT_OK and sorted(line.split("\t")[0] for line in out.splitlines()) == sorted(
        USERS
    ), err
    assert not _hits(home / "accounts", _needles(*USERS))


def test_factory_reset_erases_the_accounts_files(tmp_path: Path) -> None:
    home = tmp_path / "box"
    assert _cli("init", "--home", str(home), "--admin", CANARY_USER)[0] == EXIT_OK
    assert (home / "accounts" / "users.json").exists()
    code, _, err = _cli("provision", "factory-reset", "--home", str(home), "--yes")
    assert code == EXIT_OK, err
    assert not (home / "accounts").exists() and not (home / "galleries").exists()
