"""The embedded default backend: `Storage` on one SQLite file (see docs/storage.md)."""

from .schema import MIGRATIONS
from .store import SqliteStorage

__all__ = ["MIGRATIONS", "SqliteStorage"]
