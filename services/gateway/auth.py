"""Token auth on the WebSocket handshake: which tokens we accept and which owner name each one maps to.

The owner name, never the secret, is what leaves the gateway (scheduler rows, logs), so a database dump does not
leak credentials. Comparisons run over SHA-256 digests with ``hmac.compare_digest`` so timing reveals nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from services.common.config import ConfigError

MAX_TOKEN_CHARS = 256
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class TokenTable:
    """Accepted tokens as (owner name, secret digest) pairs."""

    entries: tuple[tuple[str, bytes], ...]

    def __len__(self) -> int:
        return len(self.entries)

    def owner_of(self, presented: str | None) -> str | None:
        """The owner name of a presented token, or None when it is missing or not one of ours."""
        if not presented or len(presented) > MAX_TOKEN_CHARS:
            return None
        digest = _digest(presented)
        owner = None
        for name, expected in self.entries:  # no early exit: every entry costs the same
            if hmac.compare_digest(digest, expected):
                owner = name
        return owner

    @classmethod
    def from_mapping(cls, secrets_by_owner: Mapping[str, str]) -> TokenTable:
        return cls(tuple((name, _digest(secret)) for name, secret in secrets_by_owner.items()))


def parse_tokens(raw: str) -> TokenTable:
    """Parse ``secret`` or ``name=secret`` entries separated by commas; a bare secret's owner is its digest prefix."""
    secrets_by_owner: dict[str, str] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, sep, secret = entry.partition("=")
        if not sep:
            name, secret = "token-" + hashlib.sha256(entry.encode()).hexdigest()[:12], entry
        if not secret or len(secret) > MAX_TOKEN_CHARS:
            raise ConfigError(f"TURBOSERVE_TOKENS: token of owner {name!r} must have 1 to {MAX_TOKEN_CHARS} characters")
        if not name or not set(name) <= _NAME_CHARS or len(name) > 64:
            raise ConfigError(f"TURBOSERVE_TOKENS: owner name {name!r} must be 1-64 of [A-Za-z0-9_-]")
        if name in secrets_by_owner:
            raise ConfigError(f"TURBOSERVE_TOKENS: owner name {name!r} appears twice")
        secrets_by_owner[name] = secret
    if not secrets_by_owner:
        raise ConfigError(f"TURBOSERVE_TOKENS={raw!r} holds no token")
    return TokenTable.from_mapping(secrets_by_owner)


def presented_token(path: str, authorization: str | None) -> str | None:
    """The token a client presented: ``Authorization: Bearer ...`` wins over the ``?token=`` query parameter.

    Browsers cannot set headers on a WebSocket handshake, hence the query parameter for the viewer page.
    """
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None
