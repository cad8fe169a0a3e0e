"""The scheduler's tables as typed SQLAlchemy 2 ORM classes; migrations/versions holds the DDL that creates them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, DateTime, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    """One streaming session; (worker_id, epoch) is its placement, fenced by the epoch."""

    __tablename__ = "sessions"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'idle', 'closed')", name="sessions_status_valid"),
        CheckConstraint("epoch >= 0 AND chunks_produced >= 0 AND next_seq >= 0", name="sessions_counters_valid"),
        Index("sessions_worker_idx", "worker_id", postgresql_where=text("worker_id IS NOT NULL")),
        Index("sessions_open_idx", "status", "created_at", postgresql_where=text("status <> 'closed'")),
        Index("sessions_owner_open_idx", "owner", postgresql_where=text("status <> 'closed'")),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    worker_id: Mapped[str | None] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(Integer)
    chunks_produced: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    next_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    prompts: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    gateway_id: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WorkerRow(Base):
    """One GPU worker as its heartbeats describe it; ``status`` is the scheduler's verdict on its liveness."""

    __tablename__ = "workers"
    __table_args__ = (
        CheckConstraint("status IN ('live', 'lost', 'gone')", name="workers_status_valid"),
        CheckConstraint("capacity >= 1 AND active_sessions >= 0", name="workers_load_valid"),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    capacity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))
    draining: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    active_sessions: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    latency_samples: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WorkerAskRow(Base):
    """A worker the scheduler asked a provisioner for and has not given back, with when it asked: what a restarted
    scheduler needs so it neither asks again for workers still starting nor forgets when their bill began."""

    __tablename__ = "worker_asks"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    asked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LearntStateRow(Base):
    """What a policy has learnt of the load (``ClosedLoopController.learnt``), as of ``saved_at``."""

    __tablename__ = "learnt_state"

    policy: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSONB)
    saved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
