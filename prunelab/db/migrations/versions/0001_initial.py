"""Initial schema: sweeps, trials and sweep_trials.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the three tables with their keys, constraints and indexes."""
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(12), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_yaml", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("orchestrator", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sweeps"),
        sa.CheckConstraint(
            "status IN ('running', 'finished', 'failed', 'interrupted')",
            name="ck_sweeps_status",
        ),
    )
    op.create_index("ix_sweeps_name", "sweeps", ["name"])

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sweep_id", sa.String(12), nullable=False),
        sa.Column("trial_key", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("started", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("is_baseline", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_trials"),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], name="fk_trials_sweep_id_sweeps"),
        sa.UniqueConstraint("trial_key", name="uq_trials_trial_key"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'finished', 'failed')",
            name="ck_trials_status",
        ),
    )
    op.create_index("ix_trials_sweep_id", "trials", ["sweep_id"])

    op.create_table(
        "sweep_trials",
        sa.Column("sweep_id", sa.String(12), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("sweep_id", "trial_id", name="pk_sweep_trials"),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name="fk_sweep_trials_sweep_id_sweeps",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["trials.id"],
            name="fk_sweep_trials_trial_id_trials",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_sweep_trials_trial_id", "sweep_trials", ["trial_id"])


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_index("ix_sweep_trials_trial_id", table_name="sweep_trials")
    op.drop_table("sweep_trials")
    op.drop_index("ix_trials_sweep_id", table_name="trials")
    op.drop_table("trials")
    op.drop_index("ix_sweeps_name", table_name="sweeps")
    op.drop_table("sweeps")
