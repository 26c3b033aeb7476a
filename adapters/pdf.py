"""HTML to PDF through one long-lived headless Chromium; the only module that uses pyppeteer.

:class:`ChromiumPdfRenderer` launches a single browser at start-up and hands out a small
pool of reused pages, so a render costs one ``setContent`` and one ``printToPDF`` rather
than a browser launch. If the browser dies it is relaunched once (at most one relaunch at a
time) and the render is retried. pyppeteer is untyped; ``Any`` does not leave this module.

Given a ``profile_root`` (the worker passes ``DATA_DIR/chromium``), the renderer keeps its
browser profiles in ``profile_root/worker-<host>-<pid>-<start ticks>/``, a folder named after
the process that owns it. A worker killed with SIGKILL cannot close its browser; the next renderer
to start under the same root finds folders whose owner is no longer alive, kills the Chromium
processes started with a profile inside them (and their children), and removes the folders. A
live worker's folder and browser are never touched.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from pyppeteer.errors import NetworkError
from pyppeteer.launcher import Launcher

log = structlog.get_logger(__name__)

_CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

_PDF_OPTIONS: dict[str, Any] = {
    "format": "A4",
    "printBackground": True,
    "margin": {"top": "14mm", "right": "14mm", "bottom": "14mm", "left": "14mm"},
}

# What pyppeteer raises when the websocket or the browser behind it has gone away,
# or when the browser stopped answering within the render timeout.
_BROWSER_LOST_ERRORS = (NetworkError, ConnectionError, TimeoutError)


class PdfRenderer(Protocol):
    async def render(self, html: str) -> bytes: ...


class ChromiumNotFoundError(FileNotFoundError):
    pass


async def _wait_or_kill(process: subprocess.Popen[bytes], grace: float) -> None:
    """Wait for ``process`` to exit without blocking the loop; SIGKILL it after ``grace`` seconds."""
    try:
        await asyncio.to_thread(process.wait, grace)
    except subprocess.TimeoutExpired:
        log.warning("pdf.browser_kill", pid=process.pid, grace_s=grace)
        process.kill()
        await asyncio.to_thread(process.wait)


class _Browser:
    """One Chromium process with its websocket, profile directory and page pool.

    A relaunch replaces the whole object, so pages of a dead browser never reach a live one.
    """

    def __init__(self, browser: Any, process: subprocess.Popen[bytes], user_data_dir: Path) -> None:
        self._browser = browser
        self._process = process
        self._user_data_dir = user_data_dir
        self._disconnected = False
        self._pages: asyncio.Queue[Any] = asyncio.Queue()
        browser.on("disconnected", self._on_disconnected)

    def _on_disconnected(self) -> None:
        self._disconnected = True

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return not self._disconnected and self._process.poll() is None

    async def add_pages(self, count: int) -> None:
        """Fill the pool, reusing the blank page the browser opens with."""
        pool = list(await self._browser.pages())[:count]
        while len(pool) < count:
            pool.append(await self._browser.newPage())
        for page in pool:
            self._pages.put_nowait(page)

    @asynccontextmanager
    async def page(self) -> AsyncIterator[Any]:
        """Borrow a page from the pool (waiting while all are busy) and give it back."""
        page = await self._pages.get()
        try:
            yield page
        finally:
            self._pages.put_nowait(page)

    async def shutdown(self, grace: float) -> None:
        """Close the browser, wait for its process to exit and remove its profile. Idempotent."""
        try:
            async with asyncio.timeout(grace):
                await self._browser.close()
        except Exception as exc:  # a dead or hung browser may fail either way; the kill below is what counts
            log.debug("pdf.browser_close_failed", pid=self.pid, error=repr(exc))
        await _wait_or_kill(self._process, grace)
        await asyncio.to_thread(shutil.rmtree, self._user_data_dir, ignore_errors=True)


async def _launch(executable_path: str, pages: int, close_timeout: float, profiles: Path | None) -> _Browser:
    user_data_dir = Path(tempfile.mkdtemp(prefix="billing-chromium-", dir=profiles))
    launcher = Launcher(
        executablePath=executable_path,
        headless=True,
        userDataDir=str(user_data_dir),
        args=list(_CHROMIUM_ARGS),
        handleSIGINT=False,
        handleSIGTERM=False,
        handleSIGHUP=False,
        autoClose=False,
    )
    try:
        # Blocks the loop while it polls Chromium's debugging port (~0.3 s).
        browser = await launcher.launch()
    except BaseException:
        process = getattr(launcher, "proc", None)
        if process is not None:
            await _wait_or_kill(process, 0)
        shutil.rmtree(user_data_dir, ignore_errors=True)
        raise
    launched = _Browser(browser, browser.process, user_data_dir)
    try:
        await launched.add_pages(pages)
    except BaseException:
        await launched.shutdown(close_timeout)
        raise
    return launched


# --- profiles left behind by dead workers ----------------------------------------------------

_OWNER_DIR = re.compile(r"worker-(?P<host>.+)-(?P<pid>\d+)-(?P<ticks>\d+)")


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited already
        return None
    return int(fields[19])


def owner_dir_name(pid: int | None = None) -> str:
    """``worker-<host>-<pid>-<start ticks>``: the pid with its start time, so a reused pid is not
    mistaken for the owner, and the host, so workers sharing a volume judge only their own host's."""
    pid = os.getpid() if pid is None else pid
    return f"worker-{socket.gethostname()}-{pid}-{_start_ticks(pid)}"


def _owner_alive(name: str) -> bool:
    match = _OWNER_DIR.fullmatch(name)
    if match is None or match["host"] != socket.gethostname():
        return True  # not a folder of this host's workers: leave it alone
    return _start_ticks(int(match["pid"])) == int(match["ticks"])


def _processes() -> Iterator[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every process we can see."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), int(stat[stat.rfind(")") + 2 :].split()[1]), argv


def _browsers_in(folder: Path) -> list[int]:
    """Chromium processes started with a profile inside ``folder``, with all their descendants."""
    prefix = f"--user-data-dir={folder}{os.sep}"
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for pid, ppid, argv in _processes():
        children.setdefault(ppid, []).append(pid)
        if any(arg.startswith(prefix) for arg in argv):
            roots.append(pid)
    found: list[int] = []
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.append(pid)
            pending.extend(children.get(pid, ()))
    return found


@dataclass
class Reaped:
    """What :func:`reap_orphaned_profiles` cleaned up."""

    killed: list[int] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def reap_orphaned_profiles(root: Path, *, wait: float = 5.0) -> Reaped:
    """Kill the browsers of dead workers' profile folders under ``root`` and remove the folders (blocking)."""
    reaped = Reaped()
    if not root.is_dir():
        return reaped
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or _owner_alive(folder.name):
            continue
        pids = _browsers_in(folder)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            reaped.killed.append(pid)
        deadline = time.monotonic() + wait
        while any(_start_ticks(pid) is not None for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(folder, ignore_errors=True)
        reaped.removed.append(folder)
        log.warning("pdf.orphaned_browser_reaped", folder=str(folder), killed=len(pids))
    return reaped


class ChromiumPdfRenderer:
    """A :class:`PdfRenderer` backed by one headless Chromium and ``pages`` reused tabs.

    Use as ``async with ChromiumPdfRenderer(path) as renderer: ...`` or call
    :meth:`start` and :meth:`close` explicitly. Templates must inline all their assets:
    pages are filled with ``setContent`` and nothing is fetched.
    """

    def __init__(
        self,
        executable_path: str,
        pages: int = 3,
        *,
        render_timeout: float = 30.0,
        close_timeout: float = 5.0,
        profile_root: Path | None = None,
    ) -> None:
        if not (os.path.isfile(executable_path) and os.access(executable_path, os.X_OK)):
            raise ChromiumNotFoundError(f"Chromium executable not found at {executable_path!r}; set CHROMIUM_PATH")
        if pages < 1:
            raise ValueError("pages must be at least 1")
        self._executable_path = executable_path
        self._pages = pages
        self._render_timeout = render_timeout
        self._close_timeout = close_timeout
        self._browser: _Browser | None = None
        self._lock = asyncio.Lock()
        self._profile_root = profile_root
        self._profiles: Path | None = None  # this process's folder under profile_root

    @property
    def pid(self) -> int | None:
        """Process id of the current browser, or ``None`` when not started."""
        return self._browser.pid if self._browser is not None else None

    async def start(self) -> None:
        async with self._lock:
            if self._browser is not None:
                return
            if self._profile_root is not None and self._profiles is None:
                self._profile_root.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(reap_orphaned_profiles, self._profile_root)
                self._profiles = self._profile_root / owner_dir_name()
                self._profiles.mkdir(exist_ok=True)
            self._browser = await _launch(self._executable_path, self._pages, self._close_timeout, self._profiles)
            log.info("pdf.browser_started", pid=self._browser.pid, pages=self._pages)

    async def render(self, html: str) -> bytes:
        """Print ``html`` to an A4 PDF."""
        browser = self._browser
        if browser is None:
            raise RuntimeError("ChromiumPdfRenderer is not started (or already closed)")
        if browser.alive:
            try:
                return await self._render_on(browser, html)
            except Exception as exc:
                if browser.alive and not isinstance(exc, _BROWSER_LOST_ERRORS):
                    raise
                log.warning("pdf.browser_lost", pid=browser.pid, error=repr(exc))
        return await self._render_on(await self._relaunch(browser), html)

    async def _render_on(self, browser: _Browser, html: str) -> bytes:
        async with browser.page() as page, asyncio.timeout(self._render_timeout):
            await page.setContent(html)
            pdf: bytes = await page.pdf(_PDF_OPTIONS)
        return pdf

    async def _relaunch(self, lost: _Browser) -> _Browser:
        """Replace ``lost`` with a new browser unless a concurrent render already did."""
        async with self._lock:
            if self._browser is None:
                raise RuntimeError("ChromiumPdfRenderer was closed")
            if self._browser is not lost:
                return self._browser
            log.warning("pdf.browser_relaunch", old_pid=lost.pid)
            await lost.shutdown(self._close_timeout)
            self._browser = await _launch(self._executable_path, self._pages, self._close_timeout, self._profiles)
            log.info("pdf.browser_relaunched", pid=self._browser.pid, old_pid=lost.pid)
            return self._browser

    async def close(self) -> None:
        """Close the browser and wait for its process to exit. Safe to call twice."""
        async with self._lock:
            browser, self._browser = self._browser, None
            profiles, self._profiles = self._profiles, None
            if browser is not None:
                await browser.shutdown(self._close_timeout)
            if profiles is not None:
                await asyncio.to_thread(shutil.rmtree, profiles, ignore_errors=True)
        if browser is not None:
            log.info("pdf.browser_closed", pid=browser.pid)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
