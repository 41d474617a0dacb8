"""Defaults of the site file that modules need without importing each other:
the store reads this one without the settings (which import the LXD
client), and the settings without the store (whose SQLAlchemy and Alembic
the node agent does not need)."""

#: The store's database where the site file's [store] url names none.
DEFAULT_STORE_URL = "sqlite:////var/lib/lxcgpu/lxcgpu.sqlite"
