"""Alembic environment: runs on the connection `Database.migrate()` hands over.

There is no alembic.ini; `manager.storage.db` builds the Config in code and
puts the open connection in `config.attributes["connection"]`.
"""

from __future__ import annotations

from alembic import context

from manager.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `fleet-manager migrate` (manager.storage.db.Database.migrate)"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
