"""Operator commands beyond administration: `doctor` (is this installation fit to serve?) and
`backup`. Like the dashboard, it may use every other area; no area uses it."""
