"""``sieve console users``: add, change, disable and list the review console's users."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sieve.cli.base import console, fail

if TYPE_CHECKING:
    from sieve.console.users import UserFile

users_app = typer.Typer(help="The review console's users: names, roles (moderator, lead) and passwords.",
                        no_args_is_help=True)


class RoleChoice(StrEnum):
    """The roles ``add`` accepts."""

    moderator = "moderator"
    lead = "lead"


UsersFileOpt = Annotated[
    Path | None,
    typer.Option("--users-file", help="The users file; default: the settings' console.users_file "
                                      "(SIEVE_CONSOLE__USERS_FILE)."),
]
PasswordStdinOpt = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from the first line of stdin (scripts) "
                                          "instead of prompting for it twice."),
]
NameArg = Annotated[str, typer.Argument(help="The user name: 1-64 characters of A-Z a-z 0-9 . _ @ -")]


def _open(users_file: Path | None) -> UserFile:
    """The users file named on the command line or in the settings; a malformed one fails."""
    from sieve.console.users import UserFile, UserFileError
    from sieve.settings import get_settings

    path = users_file if users_file is not None else get_settings().console.users_file
    try:
        return UserFile.load(path)
    except UserFileError as exc:
        fail(str(exc))


def _password(from_stdin: bool) -> str:
    """The new password: stdin's first line (without its line end) or a hidden prompt, typed twice."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("--password-stdin: stdin held no password")
        return password
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def _save(users: UserFile) -> None:
    from sieve.console.users import UserFileError

    try:
        users.save()
    except UserFileError as exc:
        fail(str(exc))


@users_app.command()
def add(
    name: NameArg,
    role: Annotated[RoleChoice, typer.Option("--role", help="moderator or lead (leads also manage the "
                                                             "queue).")],
    users_file: UsersFileOpt = None,
    password_stdin: PasswordStdinOpt = False,
) -> None:
    """Add a user with a role and a password (at least 8 characters)."""
    from sieve.console.users import UserFileError, check_name

    users = _open(users_file)
    try:
        check_name(name)  # before asking for a password
        if users.get(name) is not None:
            raise UserFileError(f"user {name!r} already exists in {users.path}")
        users.add(name, role.value, _password(password_stdin))
    except UserFileError as exc:
        fail(str(exc))
    _save(users)
    console.print(f"added {name} ({role.value}) to {users.path}", soft_wrap=True, highlight=False)


@users_app.command()
def passwd(name: NameArg, users_file: UsersFileOpt = None, password_stdin: PasswordStdinOpt = False) -> None:
    """Set a user's password (at least 8 characters)."""
    from sieve.console.users import UserFileError

    users = _open(users_file)
    if users.get(name) is None:
        fail(f"no user {name!r} in {users.path}")
    try:
        users.passwd(name, _password(password_stdin))
    except UserFileError as exc:
        fail(str(exc))
    _save(users)
    console.print(f"changed the password of {name} in {users.path}", soft_wrap=True, highlight=False)


def _switch(name: str, users_file: Path | None, enabled: bool) -> None:
    from sieve.console.users import UserFileError

    users = _open(users_file)
    try:
        users.enable(name) if enabled else users.disable(name)
    except UserFileError as exc:
        fail(str(exc))
    _save(users)
    console.print(f"{'enabled' if enabled else 'disabled'} {name} in {users.path}", soft_wrap=True,
                  highlight=False)


@users_app.command()
def disable(name: NameArg, users_file: UsersFileOpt = None) -> None:
    """Refuse a user's logins from now on (``enable`` allows them again)."""
    _switch(name, users_file, enabled=False)


@users_app.command()
def enable(name: NameArg, users_file: UsersFileOpt = None) -> None:
    """Allow a disabled user's logins again."""
    _switch(name, users_file, enabled=True)


@users_app.command("list")
def list_users(users_file: UsersFileOpt = None) -> None:
    """List the users, one a line: name, role, enabled or disabled (tab-separated, on stdout)."""
    users = _open(users_file)
    found = users.users()
    if not found:
        console.print(f"no users in {users.path}", soft_wrap=True, highlight=False)
    for user in found:
        typer.echo(f"{user.name}\t{user.role}\t{'disabled' if user.disabled else 'enabled'}")
