"""Alembic migrations, run programmatically by driver_core.storage.db (no alembic.ini)."""
