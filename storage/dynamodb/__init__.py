"""`Storage` on one DynamoDB table, for several gateway instances (see docs/storage.md)."""

from .store import DynamoDBStorage

__all__ = ["DynamoDBStorage"]
