"""Embedded defaults for one machine: PostgreSQL, the Temporal dev server, demo data, the supervisor."""
