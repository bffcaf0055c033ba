"""limits: upload quota reservations, the user's web session generation

Revision ID: 0002_limits
Revises: 0001
Create Date: 2026-12-03 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_limits"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user") as batch:
        batch.add_column(sa.Column("session_generation", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "upload_reservation",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["user.id"], name=op.f("fk_upload_reservation_owner_id_user"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_reservation")),
    )
    op.create_index(op.f("ix_upload_reservation_owner_id"), "upload_reservation", ["owner_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_upload_reservation_owner_id"), table_name="upload_reservation")
    op.drop_table("upload_reservation")
    with op.batch_alter_table("user") as batch:
        batch.drop_column("session_generation")
