"""tuned jobs: parent_id, trial and tune on job

Revision ID: 0002_tune
Revises: 0002_limits
Create Date: 2026-12-03 18:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002_tune'
down_revision: str | None = "0002_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('trial', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('tune', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_job_parent_id'), ['parent_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_job_parent_id_job'), 'job', ['parent_id'], ['id'], ondelete='CASCADE')


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_job_parent_id_job'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_job_parent_id'))
        batch_op.drop_column('tune')
        batch_op.drop_column('trial')
        batch_op.drop_column('parent_id')
