"""Each user's Jupyter host ports on GPU servers the hub reaches over the network.

Revision ID: 0004_jupyter_port
Revises: 0003_suspended
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004_jupyter_port"
down_revision: Union[str, Sequence[str], None] = "0003_suspended"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("jupyter_port", sa.Integer(), nullable=True))
        batch.create_unique_constraint("uq_users_jupyter_port", ["jupyter_port"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_jupyter_port", type_="unique")
        batch.drop_column("jupyter_port")
