"""Tool policy and the tool catalog: which tools a caller may see and call (policy), what
each server's tools are and when they change (catalog), filtering `tools/list` answers
(filtering), and the service the proxy, the dashboard and the CLI call (service)."""
