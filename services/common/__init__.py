"""What every area shares: access policy, server registry, metrics, rate limiting, errors,
validation, systemd notify. It may not import the dashboard; the server registry alone uses
the secret box (authserver.keys) and the upstream address policy (proxy) for what it stores."""
