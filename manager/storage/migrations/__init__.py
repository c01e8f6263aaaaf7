"""Alembic migrations of the manager's schema (run through `Database.migrate()`)."""
