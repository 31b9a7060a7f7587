"""The console's users file: names, roles and argon2id password hashes, kept in one YAML file.

The file looks like::

    schema_version: 1
    users:
      alice:
        role: lead
        hash: $argon2id$v=19$m=65536,t=3,p=4$...
        disabled: false
        created_at: '2026-12-03T09:14:14+00:00'
        updated_at: '2026-12-03T09:14:14+00:00'

Only hashes are stored; a password is never written, logged or kept on an object. Changes
(:meth:`UserFile.add`, :meth:`~UserFile.passwd`, :meth:`~UserFile.disable`,
:meth:`~UserFile.enable`) are made in memory and written by :meth:`UserFile.save`, which
replaces the file atomically with mode 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

log = logging.getLogger(__name__)

Role = Literal["moderator", "lead"]
ROLES: tuple[str, ...] = get_args(Role)
SCHEMA_VERSION = 1
MIN_PASSWORD_LEN = 8
NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
ENTRY_KEYS = {"role", "hash", "disabled", "created_at", "updated_at"}
# Verified against for unknown names, so that a login for a name that does not exist costs the
# same hash verification as one for a name that does. DUMMY_HASH is made with argon2's default
# parameters; a hasher with other parameters hashes _DUMMY_SECRET itself, once per UserFile.
_DUMMY_SECRET = "sieve-console-no-such-user"
DUMMY_HASH = ("$argon2id$v=19$m=65536,t=3,p=4$BV1xD8GuMUNfCcOBPfleJQ"
              "$udR857BB2DsxaZgXxMDrrFdh+iRJiGwBcdtQiAkGxjk")


@dataclass(frozen=True)
class User:
    """A console user as the web app sees it: no hash."""

    name: str
    role: Role
    disabled: bool = False

    @property
    def is_lead(self) -> bool:
        """Leads may do what moderators do and also manage the queue."""
        return self.role == "lead"


class UserFileError(ValueError):
    """The users file is unreadable or malformed, or a change to it is refused."""


def check_name(name: str) -> None:
    """Refuse a user name that is not 1-64 characters of ``A-Z a-z 0-9 . _ @ -``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UserFileError(f"user name {name!r} is not 1-64 characters of A-Z a-z 0-9 . _ @ -")


def check_password(password: str) -> None:
    """Refuse a password shorter than :data:`MIN_PASSWORD_LEN` characters."""
    if len(password) < MIN_PASSWORD_LEN:
        raise UserFileError(f"a password has at least {MIN_PASSWORD_LEN} characters")


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _timestamp(value: Any, where: str) -> str:
    """An entry's timestamp as text; YAML reads an unquoted ISO timestamp as a datetime."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, str):
        return value
    raise UserFileError(f"{where} is not a timestamp")


def _parse(data: Any, path: Path) -> dict[str, dict[str, Any]]:
    """The checked ``users`` mapping of a loaded file; raises :class:`UserFileError` naming the fault."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserFileError(f"{path}: not a mapping with schema_version and users")
    unknown = set(data) - {"schema_version", "users"}
    if unknown:
        raise UserFileError(f"{path}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserFileError(f"{path}: schema_version is {version!r}, expected {SCHEMA_VERSION}")
    users = data.get("users")
    if users is None:
        return {}
    if not isinstance(users, dict):
        raise UserFileError(f"{path}: users is not a mapping of name to entry")
    records: dict[str, dict[str, Any]] = {}
    for name, entry in users.items():
        try:
            check_name(name)
        except UserFileError as exc:
            raise UserFileError(f"{path}: {exc}") from None
        where = f"{path}: user {name!r}"
        if not isinstance(entry, dict):
            raise UserFileError(f"{where}: entry is not a mapping")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise UserFileError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        role = entry.get("role")
        if role not in ROLES:
            raise UserFileError(f"{where}: role is {role!r}, expected one of {', '.join(ROLES)}")
        pw_hash = entry.get("hash")
        if not isinstance(pw_hash, str) or not pw_hash.startswith("$argon2id$"):
            raise UserFileError(f"{where}: hash is not an argon2id hash")
        disabled = entry.get("disabled", False)
        if not isinstance(disabled, bool):
            raise UserFileError(f"{where}: disabled is {disabled!r}, expected true or false")
        records[name] = {
            "role": role,
            "hash": pw_hash,
            "disabled": disabled,
            "created_at": _timestamp(entry.get("created_at"), f"{where}: created_at"),
            "updated_at": _timestamp(entry.get("updated_at"), f"{where}: updated_at"),
        }
    return records


def _read(path: Path) -> tuple[dict[str, dict[str, Any]], tuple[int, int] | None]:
    """The checked records of ``path`` and its (mtime_ns, size); a missing file has none."""
    try:
        text = path.read_text(encoding="utf-8")
        stat = path.stat()
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserFileError(f"{path}: cannot read: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserFileError(f"{path}:{line} not YAML: {getattr(exc, 'problem', None) or exc}") from None
    return _parse(data, path), (stat.st_mtime_ns, stat.st_size)


class UserFile:
    """The users file in memory; :meth:`load` it, change it, :meth:`save` it.

    Safe to share between threads: changes, saves and rehashes hold one lock.
    """

    def __init__(self, path: Path, records: dict[str, dict[str, Any]],
                 hasher: PasswordHasher | None = None, stamp: tuple[int, int] | None = None) -> None:
        self.path = path
        self._records = records
        self._hasher = hasher if hasher is not None else PasswordHasher()
        self._stamp = stamp
        self._dummy_hash: str | None = None if self._hasher.check_needs_rehash(DUMMY_HASH) else DUMMY_HASH
        self._lock = threading.RLock()

    @classmethod
    def load(cls, path: str | Path, hasher: PasswordHasher | None = None) -> UserFile:
        """Read and check ``path``; a missing file is an empty users file.

        ``hasher`` hashes new passwords and says when a stored hash needs rehashing
        (default: argon2's own defaults).
        """
        path = Path(path)
        records, stamp = _read(path)
        return cls(path, records, hasher, stamp)

    def refresh(self) -> bool:
        """Re-read the file when it changed on disk since it was loaded or saved; True when it did.

        A server calls this before a login, so that ``sieve console users disable`` takes
        effect without a restart. A file that became malformed raises and keeps the old users.
        """
        with self._lock:
            try:
                stat = self.path.stat()
                stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                stamp = None
            except OSError as exc:
                raise UserFileError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
            if stamp == self._stamp:
                return False
            self._records, self._stamp = _read(self.path)
            return True

    def save(self) -> None:
        """Write the file atomically (a temporary file in the same folder, then a rename), mode 0600."""
        with self._lock:
            document = {"schema_version": SCHEMA_VERSION, "users": self._records}
            text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
            folder = self.path.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".tmp")
            except OSError as exc:
                raise UserFileError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    os.fchmod(out.fileno(), 0o600)
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise UserFileError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
            stat = self.path.stat()
            self._stamp = (stat.st_mtime_ns, stat.st_size)

    def add(self, name: str, role: Role, password: str) -> User:
        """Add a user (in memory; :meth:`save` writes it); an existing name is refused."""
        check_name(name)
        if role not in ROLES:
            raise UserFileError(f"role is {role!r}, expected one of {', '.join(ROLES)}")
        check_password(password)
        with self._lock:
            if name in self._records:
                raise UserFileError(f"user {name!r} already exists in {self.path}")
            stamp = _now()
            self._records[name] = {"role": role, "hash": self._hasher.hash(password), "disabled": False,
                                   "created_at": stamp, "updated_at": stamp}
        return self._user(name)

    def passwd(self, name: str, password: str) -> None:
        """Set a user's password (in memory; :meth:`save` writes it)."""
        check_password(password)
        with self._lock:
            record = self._record(name)
            record["hash"] = self._hasher.hash(password)
            record["updated_at"] = _now()

    def disable(self, name: str) -> None:
        """Refuse the user's logins from now on (in memory; :meth:`save` writes it)."""
        self._set_disabled(name, True)

    def enable(self, name: str) -> None:
        """Allow a disabled user's logins again (in memory; :meth:`save` writes it)."""
        self._set_disabled(name, False)

    def get(self, name: str) -> User | None:
        """The user named ``name``, disabled or not; None when there is none."""
        with self._lock:
            return self._user(name) if name in self._records else None

    def users(self) -> list[User]:
        """Every user, by name."""
        with self._lock:
            return [self._user(name) for name in sorted(self._records)]

    def verify(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs and they are enabled, else None.

        An unknown name costs one hash verification too, so the time taken does not tell
        names apart. A hash made with weaker parameters than the hasher's is replaced and
        the file saved (a save that fails is logged and the login still succeeds).
        """
        with self._lock:
            record = self._records.get(name)
            pw_hash = record["hash"] if record is not None else None
            if pw_hash is None and self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(_DUMMY_SECRET)
            dummy = self._dummy_hash
        if pw_hash is None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(cast(str, dummy), password)
            return None
        try:
            self._hasher.verify(pw_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        if cast(dict[str, Any], record)["disabled"]:
            return None
        if self._hasher.check_needs_rehash(pw_hash):
            self._rehash(name, pw_hash, password)
        return self._user(name)

    def _rehash(self, name: str, old_hash: str, password: str) -> None:
        """Replace ``name``'s hash (still ``old_hash``) with one of the hasher's parameters, and save."""
        new_hash = self._hasher.hash(password)
        with self._lock:
            try:
                self.refresh()  # keep changes another process saved since this file was read
            except UserFileError as exc:
                log.warning("users file: not rehashing %r: %s", name, exc)
                return
            record = self._records.get(name)
            if record is None or record["hash"] != old_hash:
                return  # changed on disk meanwhile: the newer hash stands
            record["hash"] = new_hash
            try:
                self.save()
            except UserFileError as exc:
                record["hash"] = old_hash
                log.warning("users file: rehashed %r but could not save: %s", name, exc)
            else:
                log.info("users file: rehashed %r with the current argon2 parameters", name)

    def _record(self, name: str) -> dict[str, Any]:
        record = self._records.get(name)
        if record is None:
            raise UserFileError(f"no user {name!r} in {self.path}")
        return record

    def _set_disabled(self, name: str, disabled: bool) -> None:
        with self._lock:
            record = self._record(name)
            record["disabled"] = disabled
            record["updated_at"] = _now()

    def _user(self, name: str) -> User:
        record = self._records[name]
        return User(name=name, role=record["role"], disabled=record["disabled"])
