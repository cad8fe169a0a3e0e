"""The scheduler's schema, managed by Alembic; ``migrate`` brings a database to head and is safe to repeat."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import normalize_database_url

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
_MIGRATION_LOCK_KEY = 0x7475_7262_6F73  # any constant shared by every scheduler: "turbos"


def _upgrade(connection: Connection) -> None:
    config = Config(str(ALEMBIC_INI))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(database_url: str) -> None:
    """Upgrade the schema to head in one transaction, under an advisory lock so schedulers starting together
    do not race to create the same tables; a database already at head is left untouched."""
    engine = create_async_engine(normalize_database_url(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            await connection.run_sync(_upgrade)
    finally:
        await engine.dispose()
