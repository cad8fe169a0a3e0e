"""Sessions with their placement (worker, epoch) and workers with their heartbeat-fed load.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("chunks_produced", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'idle', 'closed')", name="sessions_status_valid"),
        sa.CheckConstraint("epoch >= 0 AND chunks_produced >= 0 AND next_seq >= 0", name="sessions_counters_valid"),
    )
    op.create_index(
        "sessions_worker_idx", "sessions", ["worker_id"], postgresql_where=sa.text("worker_id IS NOT NULL")
    )
    op.create_index(
        "sessions_open_idx", "sessions", ["status", "created_at"], postgresql_where=sa.text("status <> 'closed'")
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("draining", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("active_sessions", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("latency_samples", JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('live', 'lost', 'gone')", name="workers_status_valid"),
        sa.CheckConstraint("capacity >= 1 AND active_sessions >= 0", name="workers_load_valid"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("sessions_open_idx", table_name="sessions")
    op.drop_index("sessions_worker_idx", table_name="sessions")
    op.drop_table("sessions")
