"""The PostgreSQL SchedulerStore: every decision the scheduler makes is one conditional statement here.

Moves are ``UPDATE ... SET epoch = epoch + 1 WHERE id = :id AND epoch = :expected RETURNING ...``: of two
schedulers racing to move one session, exactly one gets a row back; the other gets StaleEpoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import bindparam, delete, func, literal, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.common.config import normalize_database_url
from services.common.errors import LimitExceeded, StaleEpoch, UnknownSession
from services.common.messages import SessionStatus
from services.scheduler.store.models import LearntStateRow, SessionRow, WorkerAskRow, WorkerRow
from services.scheduler.store.protocol import (
    MAX_LATENCY_SAMPLES,
    SessionExists,
    SessionRecord,
    StoreUnavailable,
    WorkerRecord,
    WorkerReport,
    WorkerStatus,
    open_sessions_limit,
)

_SESSION_COLUMNS = tuple(SessionRow.__table__.columns)
_WORKER_COLUMNS = tuple(WorkerRow.__table__.columns)


def _session(row: Any) -> SessionRecord:
    return SessionRecord(
        session_id=row.id,
        owner=row.owner,
        prompt=row.prompt,
        seed=row.seed,
        model=row.model,
        status=row.status,
        worker_id=row.worker_id,
        epoch=row.epoch,
        chunks_produced=row.chunks_produced,
        next_seq=row.next_seq,
        created_at=row.created_at,
        updated_at=row.updated_at,
        prompts=tuple((int(seq), str(text)) for seq, text in row.prompts),
        gateway_id=row.gateway_id,
        lease_until=row.lease_until,
    )


def _worker(row: Any) -> WorkerRecord:
    status: WorkerStatus = row.status
    return WorkerRecord(
        worker_id=row.id,
        kind=row.kind,
        model=row.model,
        capacity=row.capacity,
        status=status,
        draining=row.draining,
        active_sessions=row.active_sessions,
        latency_samples=tuple((int(n), float(ms)) for n, ms in row.latency_samples),
        started_at=row.started_at,
        last_seen=row.last_seen,
    )


class PostgresStore:
    """Sessions and workers in PostgreSQL through SQLAlchemy 2 async and psycopg 3; the schema comes from
    ``services.scheduler.migrations.migrate``, never from ``create_all``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @classmethod
    def connect(cls, database_url: str, *, pool_size: int = 5) -> PostgresStore:
        engine = create_async_engine(normalize_database_url(database_url), pool_size=pool_size, pool_pre_ping=True)
        return cls(engine)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; a lost or refused connection becomes StoreUnavailable, which callers may retry."""
        try:
            async with self._engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError, PoolTimeout, OSError) as exc:
            raise StoreUnavailable(f"database unavailable: {getattr(exc, 'orig', None) or exc}") from exc

    async def insert_session(self, session: SessionRecord, *, max_open_per_owner: int = 0) -> None:
        values = {
            "id": session.session_id,
            "owner": session.owner,
            "prompt": session.prompt,
            "seed": session.seed,
            "model": session.model,
            "status": session.status,
            "worker_id": session.worker_id,
            "epoch": session.epoch,
            "chunks_produced": session.chunks_produced,
            "next_seq": session.next_seq,
            "created_at": session.created_at,
            "updated_at": session.updated_at,
            "prompts": [list(entry) for entry in session.prompts],
            "gateway_id": session.gateway_id,
            "lease_until": session.lease_until,
        }
        open_of_owner = (
            select(func.count()).select_from(SessionRow)
            .where(SessionRow.owner == session.owner, SessionRow.status != "closed").scalar_subquery()
        )
        source = select(*(literal(v, SessionRow.__table__.c[k].type).label(k) for k, v in values.items()))
        if max_open_per_owner > 0:
            source = source.where(open_of_owner < max_open_per_owner)
        statement = (
            insert(SessionRow).from_select(list(values), source).on_conflict_do_nothing(index_elements=["id"])
        )
        async with self._transaction() as conn:
            if max_open_per_owner > 0:  # one admit per owner at a time, so the count below cannot go stale
                await conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(session.owner))))
            inserted = (await conn.execute(statement.returning(SessionRow.id))).first()
            if inserted is not None:
                return
            exists = (await conn.execute(select(SessionRow.id).where(SessionRow.id == session.session_id))).first()
            held = int((await conn.execute(select(open_of_owner))).scalar_one())
        if exists is not None:
            raise SessionExists(f"session {session.session_id} already exists")
        raise LimitExceeded(open_sessions_limit(held, max_open_per_owner))

    async def claim_session(
        self, session_id: str, *, owner: str, gateway_id: str, lease_until: datetime | None
    ) -> SessionRecord:
        statement = (
            update(SessionRow)
            .where(SessionRow.id == session_id, SessionRow.owner == owner, SessionRow.status != "closed")
            .values(gateway_id=gateway_id, lease_until=lease_until, epoch=SessionRow.epoch + 1)
            .returning(*_SESSION_COLUMNS)
        )
        async with self._transaction() as conn:
            row = (await conn.execute(statement)).first()
        if row is None:
            raise UnknownSession(f"no session {session_id!r} for this token")
        return _session(row)

    async def record_prompt(self, session_id: str, from_seq: int, prompt: str) -> None:
        entry = func.jsonb_build_array(from_seq, prompt)
        kept = func.coalesce(
            select(func.jsonb_agg(literal_column("e")))
            .select_from(func.jsonb_array_elements(SessionRow.prompts).alias("e"))
            .where(literal_column("(e->>0)::bigint") != from_seq)
            .scalar_subquery(),
            literal_column("'[]'::jsonb"),
        )
        statement = (
            update(SessionRow).where(SessionRow.id == session_id)
            .values(prompts=kept.op("||")(func.jsonb_build_array(entry))).returning(SessionRow.id)
        )
        async with self._transaction() as conn:
            if (await conn.execute(statement)).first() is None:
                raise UnknownSession(f"session {session_id} does not exist")

    async def close_abandoned(self, session_id: str, *, lapsed_before: datetime, at: datetime) -> SessionRecord | None:
        lapsed = (
            select(*_SESSION_COLUMNS)
            .where(SessionRow.id == session_id, SessionRow.status != "closed", SessionRow.lease_until < lapsed_before)
            .with_for_update()
        )
        async with self._transaction() as conn:  # the row lock holds off a renewal or a claim until we are done
            row = (await conn.execute(lapsed)).first()
            if row is None:
                return None
            await conn.execute(
                update(SessionRow).where(SessionRow.id == session_id).values(status="closed", worker_id=None,
                                                                              updated_at=at)
            )
        return _session(row)

    async def renew_leases(self, gateway_id: str, next_seqs: Mapping[str, int], until: datetime) -> int:
        if not next_seqs:
            return 0
        statement = (
            update(SessionRow)
            .where(SessionRow.id == bindparam("b_id"), SessionRow.gateway_id == gateway_id,
                   SessionRow.status != "closed")
            .values(lease_until=until, next_seq=func.greatest(SessionRow.next_seq, bindparam("b_next")))
        )
        params = [{"b_id": sid, "b_next": seq} for sid, seq in next_seqs.items()]
        async with self._transaction() as conn:
            result = await conn.execute(statement, params)
        return max(result.rowcount, 0)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        async with self._transaction() as conn:
            row = (await conn.execute(select(*_SESSION_COLUMNS).where(SessionRow.id == session_id))).first()
        return None if row is None else _session(row)

    async def _fenced_update(self, session_id: str, expected_epoch: int, values: Mapping[str, Any]) -> SessionRecord:
        statement = (
            update(SessionRow)
            .where(SessionRow.id == session_id, SessionRow.epoch == expected_epoch)
            .values(dict(values))
            .returning(*_SESSION_COLUMNS)
        )
        async with self._transaction() as conn:
            row = (await conn.execute(statement)).first()
            if row is not None:
                return _session(row)
            current = (await conn.execute(select(SessionRow.epoch).where(SessionRow.id == session_id))).scalar()
        if current is None:
            raise UnknownSession(f"session {session_id} does not exist")
        raise StaleEpoch(f"session {session_id} is at epoch {current}, not the expected {expected_epoch}")

    async def set_status(
        self, session_id: str, *, expected_epoch: int, status: SessionStatus, next_seq: int | None, at: datetime
    ) -> SessionRecord:
        values: dict[str, Any] = {"status": status, "updated_at": at}
        if next_seq is not None:
            values["next_seq"] = next_seq
        return await self._fenced_update(session_id, expected_epoch, values)

    async def move_session(
        self, session_id: str, *, expected_epoch: int, worker_id: str, status: SessionStatus, at: datetime
    ) -> SessionRecord:
        values = {"worker_id": worker_id, "epoch": SessionRow.epoch + 1, "status": status, "updated_at": at}
        return await self._fenced_update(session_id, expected_epoch, values)

    async def clear_placement(
        self, session_id: str, *, expected_epoch: int, status: SessionStatus, at: datetime, next_seq: int | None = None
    ) -> SessionRecord:
        values: dict[str, object] = {"worker_id": None, "status": status, "updated_at": at}
        if next_seq is not None:
            values["next_seq"] = next_seq
        return await self._fenced_update(session_id, expected_epoch, values)

    async def withdraw_unplaced(self, session_id: str) -> bool:
        statement = delete(SessionRow).where(
            SessionRow.id == session_id, SessionRow.epoch == 0, SessionRow.worker_id.is_(None)
        )
        async with self._transaction() as conn:
            return bool((await conn.execute(statement.returning(SessionRow.id))).first())

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        statement = select(*_SESSION_COLUMNS).where(SessionRow.status != "closed")
        if owner is not None:
            statement = statement.where(SessionRow.owner == owner)
        statement = statement.order_by(SessionRow.created_at, SessionRow.id)
        async with self._transaction() as conn:
            rows = (await conn.execute(statement)).all()
        return [_session(row) for row in rows]

    async def record_chunks(self, worker_id: str, chunks: Mapping[str, int], at: datetime) -> int:
        if not chunks:
            return 0
        statement = (
            update(SessionRow)
            .where(
                SessionRow.id == bindparam("b_id"),
                SessionRow.worker_id == worker_id,
                SessionRow.chunks_produced < bindparam("b_produced"),
            )
            .values(chunks_produced=bindparam("b_produced"), updated_at=at)
        )
        rows = [{"b_id": session_id, "b_produced": produced} for session_id, produced in chunks.items()]
        async with self._transaction() as conn:
            result = await conn.execute(statement, rows)
        return max(result.rowcount, 0)

    async def upsert_worker(self, report: WorkerReport, at: datetime) -> WorkerRecord:
        samples = [[n, ms] for n, ms in report.latency_samples][-MAX_LATENCY_SAMPLES:]
        fresh = insert(WorkerRow).values(
            id=report.worker_id,
            kind=report.kind,
            model=report.model,
            capacity=report.capacity,
            status="live",
            draining=report.draining,
            active_sessions=report.active_sessions,
            latency_samples=samples,
            started_at=report.started_at,
            last_seen=at,
        )
        newest_window = f"'$[last-{MAX_LATENCY_SAMPLES - 1} to last]'"
        history = func.jsonb_path_query_array(
            WorkerRow.latency_samples.op("||")(fresh.excluded.latency_samples), literal_column(newest_window)
        )
        statement = fresh.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "kind": fresh.excluded.kind,
                "model": fresh.excluded.model,
                "capacity": fresh.excluded.capacity,
                "status": "live",
                "draining": fresh.excluded.draining,
                "active_sessions": fresh.excluded.active_sessions,
                "latency_samples": history,
                "started_at": fresh.excluded.started_at,
                "last_seen": fresh.excluded.last_seen,
            },
        ).returning(*_WORKER_COLUMNS)
        async with self._transaction() as conn:
            row = (await conn.execute(statement)).one()
        return _worker(row)

    async def retire_worker(self, worker_id: str, status: Literal["lost", "gone"]) -> bool:
        allowed_from = ("live",) if status == "lost" else ("live", "lost")
        statement = update(WorkerRow).where(WorkerRow.id == worker_id, WorkerRow.status.in_(allowed_from))
        async with self._transaction() as conn:
            result = await conn.execute(statement.values(status=status))
        return result.rowcount == 1

    async def list_workers(self) -> list[WorkerRecord]:
        async with self._transaction() as conn:
            rows = (await conn.execute(select(*_WORKER_COLUMNS).order_by(WorkerRow.id))).all()
        return [_worker(row) for row in rows]

    async def save_asks(self, asks: Mapping[str, datetime]) -> None:
        async with self._transaction() as conn:
            await conn.execute(delete(WorkerAskRow).where(WorkerAskRow.worker_id.not_in(list(asks))))
            if asks:
                fresh = insert(WorkerAskRow).values([{"worker_id": w, "asked_at": at} for w, at in asks.items()])
                await conn.execute(fresh.on_conflict_do_update(index_elements=["worker_id"],
                                                               set_={"asked_at": fresh.excluded.asked_at}))

    async def list_asks(self) -> dict[str, datetime]:
        async with self._transaction() as conn:
            rows = (await conn.execute(select(WorkerAskRow.worker_id, WorkerAskRow.asked_at))).all()
        return {row.worker_id: row.asked_at for row in rows}

    async def save_learnt(self, policy: str, state: Mapping[str, Any], at: datetime) -> None:
        fresh = insert(LearntStateRow).values(policy=policy, state=dict(state), saved_at=at)
        statement = fresh.on_conflict_do_update(index_elements=["policy"], set_={
            "state": fresh.excluded.state, "saved_at": fresh.excluded.saved_at})
        async with self._transaction() as conn:
            await conn.execute(statement)

    async def load_learnt(self, policy: str) -> tuple[dict[str, Any], datetime] | None:
        statement = select(LearntStateRow.state, LearntStateRow.saved_at).where(LearntStateRow.policy == policy)
        async with self._transaction() as conn:
            row = (await conn.execute(statement)).one_or_none()
        return None if row is None else (row.state, row.saved_at)

    async def close(self) -> None:
        await self._engine.dispose()
