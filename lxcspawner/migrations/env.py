"""Alembic environment for the lxcgpu store.

Migrations run only through :meth:`lxcspawner.store.Store.upgrade`, which
passes its open write transaction as ``config.attributes["connection"]``
(there is no alembic.ini).  To write a new revision, open a Store on a
scratch database at head and call ``alembic.command.revision(cfg,
autogenerate=True, message=...)`` with a Config built as in Store.upgrade;
then review the generated file by hand.
"""

from alembic import context

from lxcspawner.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the lxcgpu store's migrations through Store.upgrade()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters tables by copying them; batch mode does that for us.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
