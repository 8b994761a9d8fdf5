"""Users and their tokens ($PIE_HOME/auth.json, tokens kept as SHA-256 hashes), and who a request is.

Policy (pie serve):
  * no users in the store: no authentication; only a loopback bind is allowed. The user is the
    `x-pie-identity` header the client sends (pie-client does), else "local".
  * users in the store: every WebSocket upgrade and HTTP request needs a token, as
    `Authorization: Bearer TOKEN` or `Basic base64(user:TOKEN)` (pie-client: ws://user:TOKEN@host:port),
    or, on the WebSocket, an `auth_by_token` request before any other. `x-pie-identity` is trusted
    only with --trust-identity-header (an identity-terminating proxy in front).
Tokens are random (32 bytes), so one SHA-256 is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from pie.errors import PieError

TOKEN_PREFIX = "pie_"


class AuthError(PieError):
    pass


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, list[dict]]:
        if not self.path.is_file():
            return {}
        try:
            users = json.loads(self.path.read_text("utf-8")).get("users", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise AuthError(f"{self.path} is not a valid auth file ({e}); fix or remove it") from None
        return users if isinstance(users, dict) else {}

    def _save(self, users: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"users": users}, f, indent=1)
        tmp.replace(self.path)

    def add(self, user: str) -> str:
        """A new token for `user` (created if needed); only its hash is stored."""
        if not user or len(user) > 128 or any(c.isspace() or c in ":/" for c in user):
            raise AuthError(f"user name {user!r}: 1-128 characters, no spaces, ':' or '/'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        users = self.load()
        users.setdefault(user, []).append({"sha256": _hash(token), "created": int(time.time())})
        self._save(users)
        return token

    def remove(self, user: str) -> None:
        users = self.load()
        if user not in users:
            raise AuthError(f"no user {user!r} (pie auth list shows them)")
        del users[user]
        self._save(users)

    def users(self) -> dict[str, int]:
        """user -> number of tokens."""
        return {u: len(t) for u, t in self.load().items()}

    def enabled(self) -> bool:
        return bool(self.load())

    def check(self, token: str) -> str | None:
        """The user a token belongs to, or None."""
        digest = _hash(token)
        for user, tokens in self.load().items():
            for t in tokens:
                if hmac.compare_digest(t.get("sha256", ""), digest):
                    return user
        return None


def credentials(authorization: str | None) -> tuple[str | None, str | None]:
    """(token, claimed user) from an Authorization header (Bearer or Basic user:token)."""
    if not authorization:
        return None, None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None, None
    if scheme == "basic":
        try:
            user, _, token = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, None
        return token or None, user or None
    return None, None


def is_loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or bool(host and host.startswith("127."))


class Gate:
    """Decides who a connection is from its headers and peer (one per server)."""

    def __init__(self, store: TokenStore, trust_identity_header: bool) -> None:
        self.store = store
        self.trust_identity_header = trust_identity_header

    def identify(self, headers, peer: str | None) -> str | None:
        """The user, or None when the request must authenticate (no valid token given)."""
        if self.trust_identity_header and headers.get("x-pie-identity"):
            return headers["x-pie-identity"]
        if not self.store.enabled():
            if is_loopback(peer) and headers.get("x-pie-identity"):
                return headers["x-pie-identity"]
            return "local"
        token, claimed = credentials(headers.get("authorization"))
        if token is None:
            return None
        user = self.store.check(token)
        if user is None or (claimed is not None and claimed != user):
            return None
        return user
