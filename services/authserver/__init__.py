"""The OAuth 2.1 authorization server: keys, tokens, clients and client metadata documents,
authorization and consent rules, identity / sign-in. Nothing here knows the proxy or the dashboard."""
