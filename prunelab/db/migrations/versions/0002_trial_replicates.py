"""trials.replicates: the bootstrap replicates of a trial's score (a JSON list of floats).

Nullable: trials finished before this revision have none (their reports print no interval).
A plain ``ADD COLUMN`` / ``DROP COLUMN`` on both SQLite (3.35 or later) and PostgreSQL, so the
``trials`` table is never copied (a copy would cascade-delete ``sweep_trials`` on SQLite).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable ``trials.replicates`` JSON column."""
    op.add_column("trials", sa.Column("replicates", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop ``trials.replicates``."""
    op.drop_column("trials", "replicates")
