"""Negative and fault suites: attacks and failures, each asserting the exact refusal."""
