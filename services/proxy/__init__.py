"""The MCP reverse proxy: the upstream client, the MCP protocol, session mapping and usage
capture. Nothing here knows OAuth clients, sign-in or the dashboard."""
