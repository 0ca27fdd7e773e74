"""Alembic migrations for the triage database (a package so it ships inside the wheel)."""
