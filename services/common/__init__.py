"""What every area shares: the one small cache, access policy, server registry, metrics, rate limiting, errors,
validation, systemd notify. It may not import the dashboard; the server registry alone uses
the secret box (authserver.keys) and the upstream address policy (proxy) for what it stores."""
