"""Shared helpers of the PSP tests (no tests here): the emulator as a real process, and its knobs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import stripe

from devstack.services import free_port


@dataclass
class RunningEmulator:
    url: str
    admin: httpx.Client

    def knob(self, name: str, /, **body: Any) -> dict[str, Any]:
        answer = self.admin.post(f"/_emulator/{name}", json=body)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def client(self, key: str = "sk_test_roomly", **options: Any) -> stripe.StripeClient:
        """The real stripe SDK pointed at the emulator, without the SDK's own retries unless asked."""
        options.setdefault("max_network_retries", 0)
        return stripe.StripeClient(key, base_addresses={"api": self.url}, **options)

    def charges(self, **query: str) -> int:
        answer = self.admin.get("/_emulator/charges/count", params=query)
        answer.raise_for_status()
        return int(answer.json()["count"])

    def stats(self) -> dict[str, Any]:
        answer = self.admin.get("/_emulator/stats")
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def deliveries(self) -> list[dict[str, Any]]:
        answer = self.admin.get("/_emulator/webhooks/deliveries")
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()["deliveries"]
        return result


@contextmanager
def running_emulator(*extra: str) -> Iterator[RunningEmulator]:
    """``python -m devstack.psp`` on a free loopback port, ready, stopped at the end."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "devstack.psp", "--port", str(port), *extra])
    url = f"http://127.0.0.1:{port}"
    admin = httpx.Client(base_url=url, timeout=15)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if admin.get("/_emulator/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "the emulator exited"
            assert time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.05)
        yield RunningEmulator(url, admin)
    finally:
        admin.close()
        process.terminate()
        process.wait(10)
