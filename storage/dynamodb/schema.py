"""The DynamoDB table: key attributes, the GSIs and the sparse EXP index, TTL; created
or checked at open (the item layout is in docs/storage.md)."""

from __future__ import annotations

import time
from typing import Any

from ..base import (
    StorageError,
)
from .errors import _error_code

GSIS = ("GSI1", "GSI2", "GSI3")
EXP_INDEX = "EXP"
TTL_ATTRIBUTE = "expires_at_ttl"  # the table's TTL attribute (epoch seconds)
EXP_SHARDS = 8  # EXP entries of one type are spread over this many partitions
OPEN_TIMEOUT = 300.0  # seconds for a new table and its indexes to become ACTIVE
KEY_ATTRIBUTES = ("PK", "SK", *(f"{g}{p}" for g in GSIS for p in ("PK", "SK")), "EXPPK", "EXPSK")


def ensure_table(client: Any, table: str) -> None:
    try:
        description = client.describe_table(TableName=table)["Table"]
    except client.exceptions.ResourceNotFoundException:
        description = None
    if description is None:
        try:
            client.create_table(**table_spec(table))
        except client.exceptions.ResourceInUseException:
            pass  # another process is creating it: wait for it below
    description = wait_active(client, table)
    indexes = {i["IndexName"] for i in description.get("GlobalSecondaryIndexes", [])}
    missing = {*GSIS, EXP_INDEX} - indexes
    if missing:
        raise StorageError(
            f"dynamodb: table {table} lacks the indexes {', '.join(sorted(missing))}"
        )
    ttl = client.describe_time_to_live(TableName=table).get("TimeToLiveDescription", {})
    if ttl.get("TimeToLiveStatus") in (None, "DISABLED"):
        try:
            client.update_time_to_live(
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            )
        except client.exceptions.ClientError as exc:
            # Another process enabled it meanwhile ("already enabled" / in progress).
            if _error_code(exc) != "ValidationException":
                raise

def wait_active(client: Any, table: str) -> dict:
    deadline = time.monotonic() + OPEN_TIMEOUT
    while True:
        try:
            description = client.describe_table(TableName=table)["Table"]
        except client.exceptions.ResourceNotFoundException:
            description = {}
        ready = description.get("TableStatus") == "ACTIVE" and all(
            index.get("IndexStatus") == "ACTIVE"
            for index in description.get("GlobalSecondaryIndexes", [])
        )
        if ready:
            return description
        if time.monotonic() > deadline:
            raise StorageError(f"dynamodb: table {table} did not become ACTIVE")
        time.sleep(0.5)

def table_spec(table: str) -> dict:
    def index(name: str, projection: str) -> dict:
        return {
            "IndexName": name,
            "KeySchema": [
                {"AttributeName": f"{name}PK", "KeyType": "HASH"},
                {"AttributeName": f"{name}SK", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": projection},
        }

    return {
        "TableName": table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": name, "AttributeType": "S"} for name in KEY_ATTRIBUTES
        ],
        "KeySchema": [
            {"AttributeName": "PK", "KeyType": "HASH"},
            {"AttributeName": "SK", "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": [
            *(index(name, "ALL") for name in GSIS),
            index(EXP_INDEX, "KEYS_ONLY"),
        ],
    }
