"""`Storage` on one DynamoDB table, for several gateway instances."""

from .store import DynamoDBStorage

__all__ = ["DynamoDBStorage"]
