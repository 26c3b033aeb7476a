"""A stand-in worker process for the Chromium clean-up tests: a renderer under the profile root
given as argv[1], one render, then it waits to be killed (python -m tests.chromium_holder ROOT)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from adapters.pdf import ChromiumPdfRenderer
from core.settings import Settings


async def hold(root: Path) -> None:
    renderer = ChromiumPdfRenderer(Settings().chromium_path, pages=2, profile_root=root)
    await renderer.start()
    await renderer.render("<p>held</p>")
    print(f"ready {renderer.pid}", flush=True)  # noqa: T201  (the test reads it)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(hold(Path(sys.argv[1])))
