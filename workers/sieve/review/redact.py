"""Keep secrets out of what the reviewer logs, counts and hands off.

An endpoint's answer can quote the request back (a 401 body that echoes the
``Authorization`` header, a proxy's error page): every text taken from a
response or a transport error passes through a :class:`Redactor` before it
reaches an exception message, a log line or a hand-off's ``error``.
"""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "[redacted]"


class Redactor:
    """Replaces every occurrence of the given secrets in a text."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        """``text`` with each secret replaced by ``[redacted]``; redact before truncating."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text
