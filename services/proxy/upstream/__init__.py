"""The upstream HTTP client: errors, policy (SSRF guard), urls, http11 (framing), response,
pool (the client), fetch (small documents). Modules are imported directly; nothing here."""
