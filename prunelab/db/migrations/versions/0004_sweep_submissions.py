"""sweep_submissions: every submission of a spec to a sweep (a sweep is its name: submitting
the spec again extends it, and each submission's spec is kept here).

A new table only. Each existing sweep gets one row, its own submission (its spec, its
``created`` time and orchestrator), so every sweep has the submissions it was made of. A
downgrade drops the table: ``sweeps.spec`` keeps the latest spec.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-14 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``sweep_submissions`` (deleted with its sweep); one row per existing sweep."""
    op.create_table(
        "sweep_submissions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sweep_id", sa.String(12), nullable=False),
        sa.Column("submitted", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_yaml", sa.Text(), nullable=False),
        sa.Column("orchestrator", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sweep_submissions"),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name="fk_sweep_submissions_sweep_id_sweeps",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_sweep_submissions_sweep_id", "sweep_submissions", ["sweep_id"])
    op.execute(
        "INSERT INTO sweep_submissions (sweep_id, submitted, spec, spec_yaml, orchestrator) "
        "SELECT id, created, spec, spec_yaml, orchestrator FROM sweeps ORDER BY created, id"
    )


def downgrade() -> None:
    """Drop ``sweep_submissions``."""
    op.drop_index("ix_sweep_submissions_sweep_id", table_name="sweep_submissions")
    op.drop_table("sweep_submissions")
