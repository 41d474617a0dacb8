"""Prebuilt containers (lxcspawner.pool): each one's id block, and whether a
user's id block is on disk yet (only a block no container holds may be
swapped for a prebuilt container's).

Revision ID: 0005_pool
Revises: 0004_jupyter_port
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005_pool"
down_revision: Union[str, Sequence[str], None] = "0004_jupyter_port"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Users from before: their blocks may be on disk (true keeps them).
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("idmap_used", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))
    op.create_table(
        "pool_members",
        sa.Column("instance", sa.String(63), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("idmap_base", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("image", sa.String(64), nullable=True),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("instance", name="pk_pool_members"),
        sa.UniqueConstraint("idmap_base", name="uq_pool_members_idmap_base"),
    )


def downgrade() -> None:
    op.drop_table("pool_members")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("idmap_used")
