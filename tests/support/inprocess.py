"""Helpers for service-level tests: the gateway's services built in this process on a
real SQLite file (no HTTP), and a decorator running an async test body."""

from __future__ import annotations

import asyncio
import functools

from config import Config

SECRET = "s" * 40


def run(test):
    """Run an async test body on a fresh event loop (fixtures stay synchronous)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper


def make_config(tmp_path, **env) -> Config:
    """A loopback, dev-sign-in config whose state lives in tmp_path; env overrides."""
    return Config.from_env({
        "MCPGW_STATE_DIR": str(tmp_path),
        "MCPGW_STORAGE": f"sqlite:///{tmp_path}/gateway.db",
        "MCPGW_DEV_LOGIN": "1",
        "MCPGW_SECRET_KEY": SECRET,
        **env,
    })
