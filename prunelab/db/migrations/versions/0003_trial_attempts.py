"""trial_attempts: one row per attempt of a trial that ended without a result (its error).

A new table only: existing rows stay valid as they are. Trials retried before this revision
keep only their last error, in ``trials.error``; they have no attempt rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``trial_attempts`` (deleted with its trial)."""
    op.create_table(
        "trial_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_trial_attempts"),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["trials.id"],
            name="fk_trial_attempts_trial_id_trials",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("trial_id", "attempt", name="uq_trial_attempts_trial_id_attempt"),
        sa.CheckConstraint(
            "kind IN ('error', 'out_of_memory', 'worker_died', 'timeout', 'interrupted', "
            "'recording')",
            name="ck_trial_attempts_kind",
        ),
    )


def downgrade() -> None:
    """Drop ``trial_attempts``."""
    op.drop_table("trial_attempts")
