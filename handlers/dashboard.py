"""The owner UI: the home page and a first dashboard (servers the signed-in user owns or
may use). The full dashboard comes with its own issue."""

from __future__ import annotations

from handlers.base import BaseHandler


class HomeHandler(BaseHandler):
    is_page = True

    def get(self) -> None:
        self.page("home.html")


class DashboardHandler(BaseHandler):
    is_page = True

    async def get(self) -> None:
        user = self.current_user
        if user is None:
            self.redirect("/login?next=/dashboard")
            return
        self.page(
            "dashboard.html",
            servers=await self.services.servers.visible_to(user["sub"]),
            mcp_base=self.config.base_resource,
        )
