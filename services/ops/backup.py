"""`gateway.py backup PATH`: an online copy of the SQLite database; for DynamoDB, where its
own backups are."""

from __future__ import annotations

import asyncio

from config import Config
from services.common.errors import InvalidInput
from storage import open_storage
from storage.dynamodb import DynamoDBStorage
from storage.sqlite import SqliteStorage
from storage.sqlite.backup import BackupError, BackupResult, backup_database


async def backup(config: Config, path: str, *, force: bool = False) -> BackupResult:
    """Copy the configured SQLite database to `path` while gateways keep serving; refusals
    (another backend, an existing file, a failed integrity check) are InvalidInput."""
    store = open_storage(config.storage_url)  # not opened: nothing is created or migrated
    if isinstance(store, DynamoDBStorage):
        raise InvalidInput(
            f"MCPGW_STORAGE is the DynamoDB table {store.table}: back it up with DynamoDB itself, "
            f"continuously with point-in-time recovery (aws dynamodb update-continuous-backups "
            f"--table-name {store.table} --point-in-time-recovery-specification "
            f"PointInTimeRecoveryEnabled=true) or on demand (aws dynamodb create-backup "
            f"--table-name {store.table} --backup-name NAME); keep the master secret apart from it"
        )
    if not isinstance(store, SqliteStorage):
        raise InvalidInput(f"backup knows SQLite only, not {type(store).__name__}")
    try:
        return await asyncio.to_thread(backup_database, store.path, path, force=force)
    except BackupError as exc:
        raise InvalidInput(str(exc)) from None
