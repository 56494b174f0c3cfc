"""Persistence: SQLAlchemy models, Alembic migrations, and the store the authority uses."""
