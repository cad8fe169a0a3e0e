"""Sessions belong to the system, not to a gateway: the prompt history, the gateway holding the session and the
lease that gateway keeps alive, so any gateway can take a session over and the scheduler closes the ones whose
gateway died and whose client never came back.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("prompts", JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")))
    op.add_column("sessions", sa.Column("gateway_id", sa.String(128), nullable=True))
    op.add_column("sessions", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE sessions SET prompts = jsonb_build_array(jsonb_build_array(0, prompt))")
    op.create_index("sessions_owner_open_idx", "sessions", ["owner"], postgresql_where=sa.text("status <> 'closed'"))


def downgrade() -> None:
    op.drop_index("sessions_owner_open_idx", table_name="sessions")
    op.drop_column("sessions", "lease_until")
    op.drop_column("sessions", "gateway_id")
    op.drop_column("sessions", "prompts")
