"""Connected accounts: each user's own OAuth token at an upstream MCP server (discovery, client
identification, the authorization code flow, refresh under a lease, revocation)."""
