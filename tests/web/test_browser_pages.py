"""More pages in real Chromium against the real service: the API docs with the network cut off,
the jobs list's result column and live times, the comparison of two finished jobs, the job page's
warnings, stage and chart legends. Any console error or uncaught exception fails the test.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, Route, expect

from tests.web.conftest import Service
from tests.web.test_browser import Console, desktop, shoot

__all__ = ["desktop"]  # the fixture, imported so that this module's tests can ask for it

pytestmark = pytest.mark.slow


def _block_the_internet(page: Page, service: Service) -> list[str]:
    """Abort every request that would leave the server; returns the URLs that tried."""
    ours = urlsplit(service.base_url).netloc
    tried: list[str] = []

    def handle(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == ours or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            tried.append(url)
            route.abort()

    page.route("**/*", handle)
    return tried


def test_api_docs_render_with_the_network_blocked(desktop: tuple[BrowserContext, Console], service: Service,
                                                  screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()
    tried = _block_the_internet(page, service)

    page.goto(f"{service.base_url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Distillery", timeout=20_000)
    expect(page.locator(".opblock-summary-path", has_text="/v1/jobs").first).to_be_visible()
    assert page.locator(".opblock").count() >= 10  # the operations list, not only the title
    shoot(page, screenshots, "api-docs-offline")

    page.goto(f"{service.base_url}/redoc")
    expect(page.locator("h1", has_text="Distillery")).to_be_visible(timeout=20_000)
    expect(page.locator("[data-section-id='tag/jobs/operation/create_job']")).to_be_attached()
    assert page.locator("[data-section-id*='/operation/']").count() >= 10
    shoot(page, screenshots, "api-reference-offline")

    assert tried == [], f"the docs tried to reach: {tried}"
    console.assert_clean()
