"""A supervised child process: its own process group, prefixed output, a graceful ``stop()``.

Every child is started in a new session, so it leads a process group of its own: a Ctrl-C in
the terminal reaches only the supervisor, which then stops the children in order, and
``stop()`` signals the whole group, grandchildren included (uvicorn reloaders, shells).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

_OUTPUT_LOCK = threading.Lock()
_PROC = Path("/proc")


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    if _PROC.is_dir():
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited while we looked
            # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def emit(text: str) -> None:
    """Print to stdout without interleaving with the children's prefixed lines."""
    with _OUTPUT_LOCK:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Child:
    """One named child process started in its own process group.

    ``prefix_output`` pipes stdout and stderr (merged) through a thread that writes each line
    to the supervisor's stdout as ``name | line``; otherwise the child inherits both streams.
    ``quiet_when_stopping`` drops the child's output once ``stop()`` has begun (the Temporal
    dev server reports every cancelled poll as an error while shutting down).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        prefix_output: bool = True,
        quiet_when_stopping: bool = False,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.prefix_output = prefix_output
        self.quiet_when_stopping = quiet_when_stopping
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"Child({self.name!r}, pid={self.pid})"

    def start(self) -> Child:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        piped = subprocess.PIPE if self.prefix_output else None
        self._proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=piped,
            stderr=subprocess.STDOUT if self.prefix_output else None,
            start_new_session=True,
        )
        if self._proc.stdout is not None:
            self._pump = threading.Thread(
                target=self._copy_output, args=(self._proc.stdout,), name=f"output-{self.name}", daemon=True
            )
            self._pump.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def pgid(self) -> int | None:
        return self.pid  # a session leader's process group id is its pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def poll(self) -> int | None:
        """The exit code once the child has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL whatever is left.

        Returns the child's exit code (negative for a signal), None if it never started.
        Blocking: call it through ``asyncio.to_thread`` inside an event loop.
        """
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid
        self._stopping = True
        if proc.poll() is None or group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                pass
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None or group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
                proc.wait()
                settle = time.monotonic() + 5.0
                while group_alive(pgid) and time.monotonic() < settle:
                    time.sleep(0.05)
        if self._pump is not None:
            self._pump.join(timeout=2.0)
        return proc.returncode

    def _copy_output(self, stream: IO[bytes]) -> None:
        prefix = f"{self.name:<8}| ".encode()
        with stream:
            for line in iter(stream.readline, b""):
                if self._stopping and self.quiet_when_stopping:
                    continue
                with _OUTPUT_LOCK:
                    try:
                        out = sys.stdout.buffer
                        out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                        out.flush()
                    except (AttributeError, OSError, ValueError):
                        pass  # our stdout is gone (closed pipe): keep draining so the child never blocks
