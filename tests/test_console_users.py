"""The review console's users file, sign-in helpers and ``users`` commands."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import typer
import yaml
from argon2 import PasswordHasher
from typer.testing import CliRunner

from sieve.cli.console_users import users_app
from sieve.console.auth import (
    LoginLimiter,
    csrf_ok,
    header_user,
    new_csrf_token,
    session_user,
    start_session,
)
from sieve.console.users import User, UserFile, UserFileError
from sieve.settings import ConsoleSettings

PASSWORD = "correct horse battery"


def fast() -> PasswordHasher:
    """Small argon2 parameters, so the tests hash quickly."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "users.yaml"


def saved_with(path: Path, *users: tuple[str, str, str]) -> UserFile:
    users_file = UserFile.load(path, hasher=fast())
    for name, role, password in users:
        users_file.add(name, role, password)
    users_file.save()
    return UserFile.load(path, hasher=fast())


# --- the users file ---------------------------------------------------------------------------


def test_missing_file_is_empty(users_path: Path) -> None:
    assert UserFile.load(users_path).users() == []


def test_add_then_verify_after_reload(users_path: Path) -> None:
    users = saved_with(users_path, ("alice", "lead", PASSWORD), ("bob", "moderator", "bob-password"))
    assert users.verify("alice", PASSWORD) == User("alice", "lead")
    assert users.verify("alice", PASSWORD).is_lead
    bob = users.verify("bob", "bob-password")
    assert bob == User("bob", "moderator") and not bob.is_lead
    assert [u.name for u in users.users()] == ["alice", "bob"]


def test_wrong_password_and_unknown_user_are_refused(users_path: Path) -> None:
    users = saved_with(users_path, ("alice", "lead", PASSWORD))
    assert users.verify("alice", PASSWORD + "x") is None
    assert users.verify("alice", "") is None
    assert users.verify("mallory", PASSWORD) is None
    assert users.get("mallory") is None


def test_disabled_user_is_refused_until_enabled(users_path: Path) -> None:
    users = saved_with(users_path, ("alice", "moderator", PASSWORD))
    users.disable("alice")
    users.save()
    users = UserFile.load(users_path, hasher=fast())
    assert users.get("alice") == User("alice", "moderator", disabled=True)
    assert users.verify("alice", PASSWORD) is None
    users.enable("alice")
    assert users.verify("alice", PASSWORD) == User("alice", "moderator")


def test_passwd_changes_the_hash(users_path: Path) -> None:
    users = saved_with(users_path, ("alice", "lead", PASSWORD))
    before = yaml.safe_load(users_path.read_text())["users"]["alice"]["hash"]
    users.passwd("alice", "another password")
    users.save()
    after = yaml.safe_load(users_path.read_text())["users"]["alice"]["hash"]
    assert after != before and after.startswith("$argon2id$")
    users = UserFile.load(users_path, hasher=fast())
    assert users.verify("alice", PASSWORD) is None
    assert users.verify("alice", "another password") == User("alice", "lead")


def test_file_holds_no_password_and_is_private(users_path: Path) -> None:
    saved_with(users_path, ("alice", "lead", PASSWORD))
    text = users_path.read_text()
    assert PASSWORD not in text
    data = yaml.safe_load(text)
    assert data["schema_version"] == 1
    entry = data["users"]["alice"]
    assert set(entry) == {"role", "hash", "disabled", "created_at", "updated_at"}
    assert entry["hash"].startswith("$argon2id$")
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o600
    assert [p.name for p in users_path.parent.iterdir()] == ["users.yaml"]  # no temporary file left


def test_default_hasher_is_argon2_defaults(users_path: Path) -> None:
    users = UserFile.load(users_path)
    users.add("alice", "lead", PASSWORD)
    users.save()
    stored = yaml.safe_load(users_path.read_text())["users"]["alice"]["hash"]
    assert not PasswordHasher().check_needs_rehash(stored)


def test_weak_hash_is_rehashed_on_login(users_path: Path) -> None:
    saved_with(users_path, ("alice", "lead", PASSWORD))
    old = yaml.safe_load(users_path.read_text())["users"]["alice"]["hash"]
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    assert stronger.check_needs_rehash(old)
    users = UserFile.load(users_path, hasher=stronger)
    assert users.verify("alice", PASSWORD) == User("alice", "lead")
    new = yaml.safe_load(users_path.read_text())["users"]["alice"]["hash"]
    assert new != old and not stronger.check_needs_rehash(new)
    assert UserFile.load(users_path, hasher=stronger).verify("alice", PASSWORD) is not None


def test_refresh_sees_another_writers_disable(users_path: Path) -> None:
    server = saved_with(users_path, ("alice", "moderator", PASSWORD))
    admin = UserFile.load(users_path, hasher=fast())
    admin.disable("alice")
    admin.save()
    assert server.refresh()
    assert server.verify("alice", PASSWORD) is None
    assert not server.refresh()


def test_duplicate_add_is_refused(users_path: Path) -> None:
    users = saved_with(users_path, ("alice", "lead", PASSWORD))
    with pytest.raises(UserFileError, match="already exists"):
        users.add("alice", "moderator", "other password")
    assert users.get("alice") == User("alice", "lead")


@pytest.mark.parametrize("name", ["", "a" * 65, "al ice", "bob/..", "ève", "x:y"])
def test_bad_names_are_refused(users_path: Path, name: str) -> None:
    with pytest.raises(UserFileError, match="user name"):
        UserFile.load(users_path, hasher=fast()).add(name, "moderator", PASSWORD)


def test_short_password_and_bad_role_are_refused(users_path: Path) -> None:
    users = UserFile.load(users_path, hasher=fast())
    with pytest.raises(UserFileError, match="at least 8"):
        users.add("alice", "lead", "1234567")
    with pytest.raises(UserFileError, match="role"):
        users.add("alice", "admin", PASSWORD)
    assert users.users() == []
    users.add("a@b.example-1_x", "moderator", "12345678")  # every allowed character class, 8 characters
    with pytest.raises(UserFileError, match="at least 8"):
        users.passwd("a@b.example-1_x", "short")
    with pytest.raises(UserFileError, match="no user"):
        users.passwd("nobody", PASSWORD)
    with pytest.raises(UserFileError, match="no user"):
        users.disable("nobody")


GOOD_HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


@pytest.mark.parametrize(("text", "fault"), [
    ("users: [alice\n", "not YAML"),
    ("- a\n- b\n", "not a mapping"),
    ("schema_version: 2\nusers: {}\n", "schema_version is 2"),
    ("schema_version: 1\nusers: [alice]\n", "users is not a mapping"),
    ("schema_version: 1\nusers:\n  alice: lead\n", "entry is not a mapping"),
    (f"schema_version: 1\nusers:\n  alice: {{role: admin, hash: '{GOOD_HASH}'}}\n", "role is 'admin'"),
    ("schema_version: 1\nusers:\n  alice: {role: lead, hash: hunter22}\n", "not an argon2id hash"),
    (f"schema_version: 1\nusers:\n  alice: {{role: lead, hash: '{GOOD_HASH}', disabled: 'no'}}\n",
     "disabled is 'no'"),
    (f"schema_version: 1\nusers:\n  alice: {{role: lead, hash: '{GOOD_HASH}', disable: true}}\n",
     "unknown key"),
    (f"schema_version: 1\nusers:\n  'a b': {{role: lead, hash: '{GOOD_HASH}'}}\n", "user name"),
])
def test_malformed_file_names_path_and_fault(users_path: Path, text: str, fault: str) -> None:
    users_path.parent.mkdir(parents=True)
    users_path.write_text(text)
    with pytest.raises(UserFileError) as caught:
        UserFile.load(users_path)
    message = str(caught.value)
    assert str(users_path) in message and fault in message
    assert "\n" not in message


def test_hand_written_file_with_unquoted_timestamps_loads(users_path: Path) -> None:
    users_path.parent.mkdir(parents=True)
    pw_hash = fast().hash(PASSWORD)
    users_path.write_text(f"schema_version: 1\nusers:\n  alice:\n    role: lead\n    hash: '{pw_hash}'\n"
                          "    created_at: 2026-01-02T03:04:05Z\n")
    users = UserFile.load(users_path, hasher=fast())
    assert users.verify("alice", PASSWORD) == User("alice", "lead")
    users.save()
    assert yaml.safe_load(users_path.read_text())["users"]["alice"]["created_at"].startswith("2026-01-02")


# --- sign-in helpers --------------------------------------------------------------------------


def test_limiter_blocks_after_max_failures_per_key() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=60)
    keys = ["user:alice", "addr:10.0.0.1"]
    for t in range(3):
        assert limiter.allowed(keys, now=100 + t)
        limiter.failed(keys, now=100 + t)
    assert not limiter.allowed(keys, now=103)
    assert not limiter.allowed(["user:alice", "addr:10.0.0.2"], now=103)  # the name is blocked anywhere
    assert not limiter.allowed(["user:bob", "addr:10.0.0.1"], now=103)  # the address for any name
    assert limiter.allowed(["user:bob", "addr:10.0.0.2"], now=103)


def test_limiter_allows_again_after_the_window() -> None:
    limiter = LoginLimiter(max_failures=2, window_s=60)
    limiter.failed(["user:alice"], now=0)
    limiter.failed(["user:alice"], now=30)
    assert not limiter.allowed(["user:alice"], now=59)
    assert limiter.allowed(["user:alice"], now=60)  # the first failure left the window
    limiter.failed(["user:alice"], now=61)
    assert not limiter.allowed(["user:alice"], now=62)
    assert limiter.allowed(["user:alice"], now=121)


def test_limiter_success_clears_and_memory_is_bounded() -> None:
    limiter = LoginLimiter(max_failures=1, window_s=60, max_keys=3)
    limiter.failed(["user:alice"], now=0)
    assert not limiter.allowed(["user:alice"], now=1)
    limiter.succeeded(["user:alice"])
    assert limiter.allowed(["user:alice"], now=1)
    for i in range(5):
        limiter.failed([f"addr:{i}"], now=10 + i)
    assert len(limiter) == 3
    assert limiter.allowed(["addr:0"], now=20)  # dropped as the oldest beyond max_keys
    assert not limiter.allowed(["addr:4"], now=20)
    limiter.allowed([], now=1000)
    assert len(limiter) == 0  # every entry outside the window is forgotten


def test_csrf_ok() -> None:
    token = new_csrf_token()
    assert len(token) >= 40 and token != new_csrf_token()
    assert csrf_ok(token, token)
    assert not csrf_ok(token, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not csrf_ok(token, None)
    assert not csrf_ok(None, token)
    assert not csrf_ok("", "")
    assert not csrf_ok(None, None)
    assert not csrf_ok(token, "é" + token)


def test_session_user_expires_after_max_age() -> None:
    session: dict[str, object] = {}
    assert session_user(session, now=0, max_age_s=100) is None
    start_session(session, "alice", now=1000.0)
    assert session_user(session, now=1000.0, max_age_s=100) == "alice"
    assert session_user(session, now=1099.0, max_age_s=100) == "alice"
    assert session_user(session, now=1100.0, max_age_s=100) is None
    assert session_user({"user": "alice", "login_at": "1000"}, now=1000, max_age_s=100) is None
    assert session_user({"user": "", "login_at": 1000}, now=1000, max_age_s=100) is None
    assert session_user({"user": "alice", "login_at": 5000}, now=1000, max_age_s=100) is None


def test_start_session_clears_and_rotates_csrf() -> None:
    session: dict[str, object] = {"csrf": "planted", "user": "mallory", "other": 1}
    start_session(session, "alice", now=5.0)
    assert set(session) == {"user", "login_at", "csrf"}
    assert session["user"] == "alice" and session["login_at"] == 5.0
    first = session["csrf"]
    assert isinstance(first, str) and first and first != "planted"
    start_session(session, "alice", now=6.0)
    assert session["csrf"] != first


def test_header_user_is_off_by_default() -> None:
    headers = {"X-Forwarded-User": "alice"}
    assert ConsoleSettings().trusted_user_header is None
    assert header_user(headers, ConsoleSettings().trusted_user_header) is None
    assert header_user(headers, "X-Forwarded-User") == "alice"
    assert header_user({"x-forwarded-user": " alice "}, "X-Forwarded-User") == "alice"
    assert header_user({"X-Forwarded-User": "  "}, "X-Forwarded-User") is None
    assert header_user({}, "X-Forwarded-User") is None


# --- the users commands -----------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(users_app, name="users")
    return app


def invoke(*args: str, stdin: str | None = None):
    return CliRunner().invoke(cli(), ["users", *args], input=stdin, terminal_width=200)


def test_cli_round_trip(users_path: Path) -> None:
    f = ["--users-file", str(users_path)]
    result = invoke("add", "alice", "--role", "lead", *f, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert "added alice (lead)" in result.output
    result = invoke("add", "bob", "--role", "moderator", *f, "--password-stdin", stdin="bob-password\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in users_path.read_text()
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o600

    result = invoke("add", "alice", "--role", "moderator", *f, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.exit_code == 2 and "already exists" in result.output

    result = invoke("passwd", "alice", *f, "--password-stdin", stdin="new password!\n")
    assert result.exit_code == 0, result.output
    users = UserFile.load(users_path)
    assert users.verify("alice", PASSWORD) is None
    assert users.verify("alice", "new password!") == User("alice", "lead")

    result = invoke("disable", "bob", *f)
    assert result.exit_code == 0 and "disabled bob" in result.output
    result = invoke("list", *f)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["alice\tlead\tenabled", "bob\tmoderator\tdisabled"]
    assert UserFile.load(users_path).verify("bob", "bob-password") is None

    result = invoke("enable", "bob", *f)
    assert result.exit_code == 0, result.output
    assert "bob\tmoderator\tenabled" in invoke("list", *f).stdout


def test_cli_errors(users_path: Path) -> None:
    f = ["--users-file", str(users_path)]
    result = invoke("add", "alice", "--role", "lead", *f, "--password-stdin", stdin="short\n")
    assert result.exit_code == 2 and "at least 8" in result.output
    result = invoke("add", "alice", "--role", "lead", *f, "--password-stdin", stdin="")
    assert result.exit_code == 2 and "no password" in result.output
    result = invoke("add", "al ice", "--role", "lead", *f, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.exit_code == 2 and "user name" in result.output
    result = invoke("add", "alice", "--role", "admin", *f, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.exit_code == 2
    assert not users_path.exists()
    for command in ("passwd", "disable", "enable"):
        result = invoke(command, "nobody", *f, "--password-stdin", stdin=PASSWORD + "\n") \
            if command == "passwd" else invoke(command, "nobody", *f)
        assert result.exit_code == 2 and "no user 'nobody'" in result.output, command
    result = invoke("list", *f)
    assert result.exit_code == 0 and "no users" in result.output and result.stdout == ""
    users_path.parent.mkdir(parents=True, exist_ok=True)
    users_path.write_text("schema_version: 9\n")
    result = invoke("list", *f)
    assert result.exit_code == 2 and "schema_version is 9" in result.output


def test_cli_prompts_twice_for_the_password(users_path: Path) -> None:
    result = invoke("add", "carol", "--role", "moderator", "--users-file", str(users_path),
                    stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output  # hidden input is not echoed
    assert UserFile.load(users_path).verify("carol", PASSWORD) == User("carol", "moderator")


def test_cli_default_file_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sieve.settings import get_settings

    target = tmp_path / "from-settings.yaml"
    monkeypatch.setenv("SIEVE_CONSOLE__USERS_FILE", str(target))
    get_settings.cache_clear()
    try:
        result = invoke("add", "dave", "--role", "lead", "--password-stdin", stdin=PASSWORD + "\n")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert UserFile.load(target).get("dave") == User("dave", "lead")


def test_dummy_hash_matches_the_default_parameters() -> None:
    from sieve.console.users import _DUMMY_SECRET, DUMMY_HASH

    assert PasswordHasher().verify(DUMMY_HASH, _DUMMY_SECRET)
    assert not PasswordHasher().check_needs_rehash(DUMMY_HASH)
