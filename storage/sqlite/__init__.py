"""The embedded default backend: `Storage` on one SQLite file."""

from .store import MIGRATIONS, PROBE_BUDGET, WRITE_BUDGET, SqliteStorage, _transaction

__all__ = ["MIGRATIONS", "PROBE_BUDGET", "WRITE_BUDGET", "SqliteStorage", "_transaction"]
