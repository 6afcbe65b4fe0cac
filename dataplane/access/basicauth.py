"""HTTP Basic authentication against htpasswd lines (pure).

Supported hashes: bcrypt (`$2y$`, `$2b$`, `$2a$`, checked with the `bcrypt` package)
and `{SHA}` (base64 of SHA-1, as `htpasswd -s` writes; compared in constant time).
Other formats (MD5-crypt `$apr1$`, crypt(3), plain text) are refused when the policy
is built, so a user who cannot ever log in is reported instead of silently locked out.

bcrypt is slow on purpose (tens of milliseconds); a successful check is remembered for
the exact (user, password) pair, keyed by a SHA-256 digest, in a small bounded cache,
so a client sending the same credentials on every request pays once. `bcrypt` is
loaded when a policy with a bcrypt hash is compiled, not before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable

_CACHE_SIZE = 1024


def parse_htpasswd(text: str) -> dict[str, str]:
    """user -> hash; raises ValueError naming the line of an unsupported entry."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"htpasswd line {number}: not user:hash")
        if not (hashed.startswith(("$2y$", "$2b$", "$2a$")) or hashed.startswith("{SHA}")):
            raise ValueError(f"htpasswd line {number} (user {user}): only bcrypt and {{SHA}} "
                             "hashes are supported")
        users[user] = hashed
    return users


def credentials(authorization: bytes) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic` value, or None."""
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class BasicUsers:
    """One rule's users, and the challenge sent with a 401."""

    __slots__ = ("challenge", "forward_header", "users", "_checkpw", "_verified")

    def __init__(self, htpasswd: str, realm: str, forward_header: str | None) -> None:
        self.users = parse_htpasswd(htpasswd)
        self._checkpw: Callable[[bytes, bytes], bool] = _no_bcrypt
        if any(not hashed.startswith("{SHA}") for hashed in self.users.values()):
            import bcrypt

            self._checkpw = bcrypt.checkpw
        self.challenge = b'WWW-Authenticate: Basic realm="%b", charset="UTF-8"\r\n' % (
            realm.replace('"', "'").encode("latin-1"))
        self.forward_header = None if forward_header is None else forward_header.encode("latin-1")
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    def check(self, user: str, password: str) -> bool:
        """Whether `password` is `user`'s."""
        hashed = self.users.get(user)
        if hashed is None:
            return False
        memo = hashlib.sha256(f"{user}\x00{password}\x00{hashed}".encode()).digest()
        if memo in self._verified:
            self._verified.move_to_end(memo)
            return True
        if hashed.startswith("{SHA}"):
            digest = base64.b64encode(hashlib.sha1(password.encode("utf-8")).digest())
            ok = hmac.compare_digest(digest, hashed[5:].encode("ascii", "replace"))
        else:
            try:
                ok = self._checkpw(password.encode("utf-8"), hashed.encode("ascii"))
            except ValueError:
                ok = False
        if ok:
            self._verified[memo] = None
            if len(self._verified) > _CACHE_SIZE:
                self._verified.popitem(last=False)
        return ok


def _no_bcrypt(password: bytes, hashed: bytes) -> bool:
    """A policy without bcrypt hashes never checks one."""
    return False
