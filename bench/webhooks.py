"""PSP webhook intake end to end, against the bare cost of storing the same events, in the same run.

``python -m bench.webhooks [--events 2000] [--duplicates 0.2] [--clients 8]``

On the embedded PostgreSQL under ``.data/bench-pg`` (or the server in ``DATABASE_URL``), in a
fresh database migrated to head and dropped at the end:

(a) baseline: each event's row written with one ``INSERT ... ON CONFLICT DO NOTHING`` through
    asyncpg, ``--clients`` connections at once: the floor of any intake that stores every event;
(b) real: the same events signed as Stripe signs them (``Stripe-Signature: t=…,v1=HMAC``) and
    POSTed to ``/v1/webhooks/stripe`` of the API served by uvicorn on a loopback port, by
    ``--clients`` concurrent HTTP clients: signature check, parse, store once, answer.

Both include ``--duplicates`` (a share of the events sent twice, as a PSP retries). Reported:
events/s of each and the ratio (b)/(a), with every answer checked (200, and each event stored once).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from core.observability import configure_logging
from core.settings import PROJECT_ROOT, LogFormat, Settings, get_settings
from core.temporal import data_converter
from devstack.services import serving
from schema.db import libpq_url, scratch_database

SECRET = "whsec_bench"
_INSERT = """
    INSERT INTO psp_events (id, type, created, payload, received_at, status, object_id)
    VALUES ($1, $2, to_timestamp($3), $4::jsonb, now(), 'received', $5)
    ON CONFLICT (id) DO NOTHING
"""


@dataclass(frozen=True)
class Measurement:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def make_events(count: int, duplicates: float) -> list[bytes]:
    """``count`` distinct payment events, then ``duplicates`` of them again, interleaved."""
    bodies = []
    for i in range(count):
        body = {
            "id": f"evt_bench_{i:07d}",
            "object": "event",
            "type": "payment_intent.succeeded" if i % 5 else "payment_intent.payment_failed",
            "created": 1_795_000_000 + i,
            "livemode": False,
            "data": {"object": {"id": f"pi_bench_{i:07d}", "object": "payment_intent", "amount": 1000 + i}},
        }
        bodies.append(json.dumps(body).encode())
    repeats = bodies[: int(count * duplicates)]
    return [b for pair in zip(bodies, repeats + [b""] * (count - len(repeats)), strict=True) for b in pair if b]


def sign(body: bytes) -> str:
    t = int(time.time())
    digest = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


async def baseline(url: str, bodies: list[bytes], clients: int) -> Measurement:
    pool = await asyncpg.create_pool(libpq_url(url), min_size=clients, max_size=clients)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def work() -> None:
        async with pool.acquire() as conn:
            while not queue.empty():
                event = json.loads(queue.get_nowait())
                await conn.execute(
                    _INSERT,
                    event["id"],
                    event["type"],
                    event["created"],
                    json.dumps(event),
                    event["data"]["object"]["id"],
                )

    started = time.perf_counter()
    await asyncio.gather(*(work() for _ in range(clients)))
    seconds = time.perf_counter() - started
    await pool.close()
    return Measurement(f"(a) baseline: asyncpg INSERT per event, {clients} connections", len(bodies), seconds)


async def real(url: str, bodies: list[bytes], clients: int, data_dir: Path) -> Measurement:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(sys.executable).parent / "temporal-test-server"),
        data_converter=data_converter,
    )
    settings = Settings(
        database_url=url,
        temporal_address=env.client.service_client.config.target_host,
        data_dir=data_dir,
        stripe_webhook_secret=SECRET,
        log_format=LogFormat.json,
        log_level="WARNING",
    )
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    answers: list[int] = []

    async def work(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            response = await client.post("/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": sign(body)})
            answers.append(response.status_code)

    try:
        with serving(create_app(settings)) as api:
            async with httpx.AsyncClient(base_url=api, timeout=30) as client:
                started = time.perf_counter()
                await asyncio.gather(*(work(client) for _ in range(clients)))
                seconds = time.perf_counter() - started
    finally:
        await env.shutdown()
    if set(answers) != {200}:
        raise SystemExit(f"unexpected answers: {sorted(set(answers))}")
    return Measurement(f"(b) real: signed POST /v1/webhooks/stripe, {clients} clients", len(bodies), seconds)


async def run(server_url: str, events: int, duplicates: float, clients: int) -> list[Measurement]:
    bodies = make_events(events, duplicates)
    distinct = len({json.loads(b)["id"] for b in bodies})
    results = []
    for name, measure in (("baseline", baseline), ("real", real)):
        async with scratch_database(server_url, f"billing_bench_{name}") as url:
            if measure is real:
                result = await real(url, bodies, clients, PROJECT_ROOT / ".data" / "bench-webhooks")
            else:
                result = await baseline(url, bodies, clients)
            conn = await asyncpg.connect(libpq_url(url))
            stored = await conn.fetchval("SELECT count(*) FROM psp_events")
            await conn.close()
            if stored != distinct:
                raise SystemExit(f"{name}: {stored} events stored, {distinct} expected")
            results.append(result)
    return results


def report(results: Sequence[Measurement]) -> None:
    print(f"{'variant':60} {'events':>7} {'seconds':>8} {'events/s':>9}")
    for m in results:
        print(f"{m.name:60} {m.events:7d} {m.seconds:8.2f} {m.rate:9.0f}")
    base, real_ = results
    print(f"ratio real/baseline = {real_.rate / base.rate:.2f}x (each event stored once; every answer 200)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--duplicates", type=float, default=0.2)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    configure_logging(get_settings().model_copy(update={"log_level": "WARNING"}))
    settings = get_settings()
    if settings.database_url:
        report(asyncio.run(run(settings.database_url, args.events, args.duplicates, args.clients)))
        return
    from devstack.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(PROJECT_ROOT / ".data" / "bench-pg")
    pg.start()
    try:
        print("PostgreSQL: embedded, " + str(PROJECT_ROOT / ".data" / "bench-pg"))
        report(asyncio.run(run(pg.url("postgres"), args.events, args.duplicates, args.clients)))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
