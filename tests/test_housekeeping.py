"""Housekeeping that runs in the background: usage history retention
(MCPGW_USAGE_RETENTION_DAYS), on the real services and a real SQLite file."""

from __future__ import annotations

import time

import pytest

from config import ConfigError
from services import build_services
from storage.base import UsageEvent
from tests.support.inprocess import make_config, run


def usage(at: float, target: str) -> UsageEvent:
    return UsageEvent(at, "srv_h", "u1", "u1@x.org", "c1", "tools/call", target, "ok", 5.0, 10, 20, "2025")


@run
async def test_usage_history_older_than_the_retention_is_purged_and_aggregates_stay(tmp_path):
    services = build_services(make_config(tmp_path, MCPGW_USAGE_RETENTION_DAYS="2"))
    await services.start(background=False)
    try:
        now = time.time()
        await services.storage.usage.record_usage([usage(now - 3 * 86400, "old"), usage(now - 86400, "recent"),
                                             usage(now, "now")])
        assert await services.purge_old_usage(now) == 1
        kept = await services.storage.usage.recent_usage("srv_h", float("inf"), 10)
        assert [e.target for e in kept] == ["now", "recent"]
        totals = {r.target: r.calls for r in await services.storage.usage.usage_rollup("srv_h", "2000-01-01")}
        assert totals == {"old": 1, "recent": 1, "now": 1}
    finally:
        await services.stop()


def test_retention_must_be_a_sensible_number_of_days(tmp_path):
    with pytest.raises(ConfigError, match="MCPGW_USAGE_RETENTION_DAYS"):
        make_config(tmp_path, MCPGW_USAGE_RETENTION_DAYS="0")
