"""Helpers of the browser tests (no tests here): headless Chromium (pyppeteer, ``CHROMIUM_PATH``) and
a page whose console errors, page errors, failed requests and unexpected error answers are
collected, with its screenshots. Taken from the portal's browser test so both areas share one."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pyppeteer import launch
from pyppeteer.browser import Browser
from pyppeteer.page import Page

from core.settings import PROJECT_ROOT

SHOTS = PROJECT_ROOT / ".data" / "screenshots"  # the README's pictures are copied from here to docs/screenshots


@asynccontextmanager
async def chromium(executable: str) -> AsyncIterator[Browser]:
    browser = await launch(
        executablePath=executable,
        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        handleSIGINT=False, handleSIGTERM=False, handleSIGHUP=False,
    )  # fmt: skip
    try:
        yield browser
    finally:
        await browser.close()


class Watched:
    """A page whose console errors, page errors, failed requests and error answers are collected."""

    def __init__(self, page: Page, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.problems: list[str] = []
        self.expected: set[tuple[int, str]] = set()  # (status, path) answers a step asked for
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure()}"))
        page.on("response", self._answered)

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        # Chromium logs every 4xx/5xx answer as well; ``_answered`` judges those (by status and path).
        answered = re.fullmatch(r"Failed to load resource: .* status of (\d+) .*", message.text)
        if answered and int(answered.group(1)) in {code for code, _ in self.expected}:
            return
        self.problems.append(f"console: {message.text}")

    def _answered(self, response: Any) -> None:
        path = "/" + response.url.split("/", 3)[3] if response.url.count("/") >= 3 else response.url
        if response.status >= 400 and (response.status, path.split("?")[0]) not in self.expected:
            self.problems.append(f"{response.status} {response.url}")

    async def shot(self, name: str) -> None:
        await self.page.screenshot({"path": str(self.shots / f"{name}.png"), "fullPage": True})

    async def text(self, selector: str) -> str:
        value: str = await self.page.querySelectorEval(selector, "e => e.textContent.trim()")
        return value

    async def fetch(self, path: str) -> dict[str, Any]:
        """GET ``path`` from inside the page (its cookies, its origin): status, type, body base64."""
        answer: dict[str, Any] = await self.page.evaluate(
            """async (path) => {
                const r = await fetch(path, {credentials: 'same-origin'});
                const bytes = new Uint8Array(await r.arrayBuffer());
                let s = ''; for (const b of bytes) s += String.fromCharCode(b);
                return {status: r.status, type: r.headers.get('content-type'), body: btoa(s)};
            }""",
            path,
        )
        return answer


def keep_screenshots(shots: Path) -> None:
    """Copy a test's screenshots to ``.data/screenshots`` (test artifacts kept after the run)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for picture in shots.iterdir():
        shutil.copy(picture, SHOTS / picture.name)
