"""Alembic environment: runs on the connection ``migrate`` hands over, or on its own async engine from the CLI."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import CommonSettings, normalize_database_url
from services.scheduler.store.models import Base


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_cli() -> None:
    url = context.config.get_main_option("sqlalchemy.url") or CommonSettings.from_env().database_url
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


shared_connection = context.config.attributes.get("connection")
if shared_connection is not None:
    _run(shared_connection)
else:
    asyncio.run(_run_from_cli())
