"""Typed settings read from the environment once, in ``main()``; every field has a bound and a line of doc."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """A setting is missing or out of bounds; the message names the variable and the value."""


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, *, low: int, high: int, environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of bounds [{low}, {high}]")
    return value


def env_float(name: str, default: float, *, low: float, high: float,
              environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of bounds [{low}, {high}]")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> str:
    value = environ.get(name, default)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True, slots=True)
class CommonSettings:
    """What every service needs."""

    nats_url: str
    """NATS server URL (NATS_URL)."""
    database_url: str
    """SQLAlchemy URL of PostgreSQL with the psycopg driver (DATABASE_URL)."""
    model: str
    """Model config served by this deployment (TURBOSERVE_MODEL): tiny on CPU; self-forcing, causvid or longlive
    on a GPU."""

    @classmethod
    def from_env(cls) -> CommonSettings:
        return cls(
            nats_url=env_str("NATS_URL", "nats://127.0.0.1:4222"),
            database_url=normalize_database_url(env_str("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")),
            model=env_str("TURBOSERVE_MODEL", "tiny"),
        )


def normalize_database_url(url: str) -> str:
    """Accept plain postgres:// URLs and pin the async psycopg 3 driver SQLAlchemy needs."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ConfigError(f"DATABASE_URL={url!r} is not a PostgreSQL URL")


def libpq_url(url: str) -> str:
    """The same database as a URL psycopg connects to by itself: libpq knows no SQLAlchemy driver name."""
    return "postgresql://" + normalize_database_url(url).removeprefix("postgresql+psycopg://")
