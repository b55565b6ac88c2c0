"""`open_storage(url)`: the backend named by a MCPGW_STORAGE URL, unopened (call
`await storage.open()`)."""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

from .base import Storage
from .dynamodb import DynamoDBStorage
from .sqlite import SqliteStorage

SQLITE_PREFIX = "sqlite:///"
EXPECTED = (
    "expected sqlite:///relative/path, sqlite:////absolute/path "
    "or dynamodb://TABLE?region=R&endpoint=URL"
)


def open_storage(url: str) -> Storage:
    """The backend for a MCPGW_STORAGE URL; ValueError with one clear sentence when the
    URL is not usable. Opening (schema creation, connections) is left to `open()`."""
    url = url.strip()
    if not url:
        raise ValueError(f"MCPGW_STORAGE is empty; {EXPECTED}")
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        return SqliteStorage(_sqlite_path(url))
    if scheme == "dynamodb":
        return _dynamodb(url)
    raise ValueError(f"MCPGW_STORAGE: unsupported storage URL {url!r}; {EXPECTED}")


def _sqlite_path(url: str) -> str:
    """SQLAlchemy style: three slashes then the path, so an absolute path has four."""
    if not url.lower().startswith(SQLITE_PREFIX):
        # sqlite://host/... or sqlite:relative: a host part or a missing slash is
        # almost always a typo for one slash too few.
        raise ValueError(f"MCPGW_STORAGE: bad SQLite URL {url!r}; {EXPECTED}")
    path = url[len(SQLITE_PREFIX) :]
    if not path:
        raise ValueError(f"MCPGW_STORAGE: SQLite URL {url!r} names no file; {EXPECTED}")
    if "?" in path or "#" in path:
        raise ValueError(
            f"MCPGW_STORAGE: SQLite URL {url!r} has query or fragment parts, "
            "which are not supported"
        )
    if path.endswith("/"):
        raise ValueError(f"MCPGW_STORAGE: SQLite URL {url!r} names a directory, not a file")
    return path


# DynamoDB's own rule for table names.
TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")


def _dynamodb(url: str) -> DynamoDBStorage:
    """dynamodb://TABLE?region=R&endpoint=URL; the region may come from AWS_REGION."""
    parts = urlsplit(url)
    if not url.lower().startswith("dynamodb://") or parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"MCPGW_STORAGE: bad DynamoDB URL {url!r}; {EXPECTED}")
    table = parts.netloc
    if not TABLE_NAME.fullmatch(table):
        raise ValueError(
            f"MCPGW_STORAGE: bad DynamoDB table name {table!r} in {url!r} "
            "(3-255 characters of A-Z a-z 0-9 _ . -)"
        )
    try:
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)))
    except ValueError:
        raise ValueError(f"MCPGW_STORAGE: bad query in DynamoDB URL {url!r}; {EXPECTED}") from None
    unknown = sorted(set(query) - {"region", "endpoint"})
    if unknown:
        raise ValueError(
            f"MCPGW_STORAGE: unknown DynamoDB URL parameter(s) {', '.join(unknown)}; {EXPECTED}"
        )
    region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
    if not re.fullmatch(r"[a-z0-9-]+", region):
        raise ValueError(
            f"MCPGW_STORAGE: DynamoDB URL {url!r} names no valid region "
            "(add ?region=R or set AWS_REGION)"
        )
    endpoint = query.get("endpoint", "")
    if endpoint:
        target = urlsplit(endpoint)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(
                f"MCPGW_STORAGE: DynamoDB endpoint {endpoint!r} is not an http(s) URL"
            )
    return DynamoDBStorage(table, region, endpoint)
