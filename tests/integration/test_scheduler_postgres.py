"""The scheduler's schema and PostgreSQL store against a real server: migrations, the store contract, and the
epoch fence under a real race."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from alembic import command
from alembic.config import Config

from services.common.errors import StaleEpoch
from services.common.nats_server import free_port
from services.scheduler.migrations import ALEMBIC_INI, migrate
from services.scheduler.store.postgres import PostgresStore
from services.scheduler.store.protocol import SchedulerStore, StoreUnavailable
from tests.unit.test_scheduler_store_contract import T0, StoreContract, a_session

pytestmark = pytest.mark.integration


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def scheduler_database_url(database_url: str) -> Iterator[str]:
    """A database of the scheduler tests' own, so the shared session database stays as other tests expect it."""
    name = f"scheduler_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(database_url, name)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
async def migrated_database_url(scheduler_database_url: str) -> str:
    await migrate(scheduler_database_url)
    return scheduler_database_url


def empty_tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE sessions, workers, worker_asks, learnt_state")


def public_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
    return [name for (name,) in rows]


def alembic_upgrade_head(url: str) -> None:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")


async def test_upgrade_to_head_on_an_empty_database_creates_the_schema_and_repeating_it_changes_nothing(
    database_url: str,
) -> None:
    name = f"scheduler_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(database_url, name)
    try:
        assert public_tables(url) == []
        await asyncio.to_thread(alembic_upgrade_head, url)  # what `alembic -c .../alembic.ini upgrade head` runs
        assert public_tables(url) == ["alembic_version", "learnt_state", "sessions", "worker_asks", "workers"]
        await asyncio.gather(migrate(url), migrate(url))  # two schedulers starting together
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TestPostgresStore(StoreContract):
    @pytest.fixture
    async def store(self, migrated_database_url: str) -> AsyncIterator[SchedulerStore]:
        empty_tables(migrated_database_url)
        store = PostgresStore.connect(migrated_database_url, pool_size=4)
        yield store
        await store.close()
        await store.close()


async def test_of_two_schedulers_racing_to_move_one_session_exactly_one_wins(migrated_database_url: str) -> None:
    empty_tables(migrated_database_url)
    stores = [PostgresStore.connect(migrated_database_url, pool_size=2) for _ in range(2)]
    try:
        await stores[0].insert_session(a_session("raced"))
        results = await asyncio.gather(
            *(
                store.move_session("raced", expected_epoch=1, worker_id=f"w{i}", status="active", at=T0)
                for i, store in enumerate(stores)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1 and [type(r) for r in results if isinstance(r, BaseException)] == [StaleEpoch]
        assert await stores[1].get_session("raced") == winners[0]
        assert winners[0].epoch == 2
    finally:
        for store in stores:
            await store.close()


async def test_a_database_that_does_not_answer_is_reported_as_unavailable() -> None:
    store = PostgresStore.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await store.get_session("s1")
        assert refused.value.code == "unavailable"
    finally:
        await store.close()
