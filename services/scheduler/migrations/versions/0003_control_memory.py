"""What the control loop keeps across its own restarts: the workers it asked for and has not given back, and what
its policy has learnt of the load. A scheduler that restarts then neither asks again for workers still starting
nor sizes the pool from priors for hours.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_asks",
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("asked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "learnt_state",
        sa.Column("policy", sa.String(64), primary_key=True),
        sa.Column("state", JSONB(), nullable=False),
        sa.Column("saved_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("learnt_state")
    op.drop_table("worker_asks")
