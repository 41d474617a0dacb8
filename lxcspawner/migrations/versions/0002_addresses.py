"""Containers' addresses on their GPU server's bridge, assigned by lxcgpu.

Revision ID: 0002_addresses
Revises: 0001_initial
Create Date: 2026-12-02

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002_addresses"
down_revision: Union[str, Sequence[str], None] = "0001_initial"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "addresses",
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("address", sa.String(45), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user", "server", name="pk_addresses"),
        sa.ForeignKeyConstraint(["user"], ["users.name"], name="fk_addresses_user_users",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("server", "address", name="uq_addresses_server_address"),
    )


def downgrade() -> None:
    op.drop_table("addresses")
