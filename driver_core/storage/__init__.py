"""Persistence: SQLAlchemy 2 async models, engine, migrations and secret encryption."""
