"""The initial store: users, their SSH keys and forwards, and the audit log.

Revision ID: 0001_initial
Revises:
Create Date: 2026-05-09

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("ssh_port", sa.Integer(), nullable=False),
        sa.Column("idmap_base", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_users"),
        sa.UniqueConstraint("ssh_port", name="uq_users_ssh_port"),
        sa.UniqueConstraint("idmap_base", name="uq_users_idmap_base"),
    )
    op.create_table(
        "ssh_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ssh_keys"),
        sa.ForeignKeyConstraint(["user"], ["users.name"], name="fk_ssh_keys_user_users",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("user", "fingerprint", name="uq_ssh_keys_user_fingerprint"),
    )
    op.create_table(
        "forwards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("server", sa.String(63), nullable=False),
        sa.Column("host_port", sa.Integer(), nullable=False),
        sa.Column("container_port", sa.Integer(), nullable=False),
        sa.Column("proto", sa.String(8), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_forwards"),
        sa.ForeignKeyConstraint(["user"], ["users.name"], name="fk_forwards_user_users",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("server", "host_port", name="uq_forwards_server_host_port"),
        sa.UniqueConstraint("user", "server", "container_port", "proto",
                            name="uq_forwards_user_server_container_port_proto"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_target", "audit", ["target"])


def downgrade() -> None:
    op.drop_index("ix_audit_target", table_name="audit")
    op.drop_table("audit")
    op.drop_table("forwards")
    op.drop_table("ssh_keys")
    op.drop_table("users")
