"""Seed the demo data into a running API: the Helm chart's demo-data Job (dev only).

    python -m devstack.seed_demo --api http://roomly-billing-api:8000 [--wait 300]

Waits up to ``--wait`` seconds for the API's ``/healthz``, then creates the demo meters, plans, promo
code, rooms, tenants with saved cards, subscriptions and a month of usage exactly as `make up` does
(:func:`devstack.demo.seed`: get-or-create by code and e-mail, deterministic idempotency keys), so
running it after every release adds nothing twice. It bills nothing: the nightly Schedule does.
It calls the API as the service client named by ``SEED_CLIENT_ID`` and ``SEED_CLIENT_SECRET`` (an
operator client, `python -m devstack.users create-client`; the chart mounts both from its Secret).
Exit status: 0 seeded (or already there), 1 the API never became healthy or refused a request, 2 no
client credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx
import structlog

from core.observability import configure_logging
from core.settings import get_settings
from devstack import demo
from devstack.services import ServiceError, wait_for_http
from devstack.users import Login, TokenLogin

log = structlog.get_logger("seed_demo")


async def seed(api: str, wait: float, login: Login) -> int:
    try:
        await wait_for_http(f"{api}/healthz", max_wait=wait)
        async with httpx.AsyncClient(base_url=api, timeout=60.0, auth=TokenLogin(login)) as client:
            summary = await demo.seed(client, datetime.now(UTC))
    except (ServiceError, demo.DemoError, httpx.HTTPError) as err:
        log.error("demo data not seeded", api=api, error=str(err))
        return 1
    log.info(summary.line(), api=api, rejected=summary.rejections)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.seed_demo", description="Seed the demo data, idempotently."
    )
    parser.add_argument("--api", required=True, help="base URL of the API, e.g. http://roomly-billing-api:8000")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for /healthz (default 300)")
    args = parser.parse_args(argv)
    configure_logging(get_settings())
    client_id, secret = os.environ.get("SEED_CLIENT_ID"), os.environ.get("SEED_CLIENT_SECRET")
    if not client_id or not secret:
        log.error("SEED_CLIENT_ID and SEED_CLIENT_SECRET must name the service client to post the demo as")
        return 2
    login = Login("demo seeding client", client_id, secret, "client_credentials")
    return asyncio.run(seed(args.api.rstrip("/"), args.wait, login))


if __name__ == "__main__":
    sys.exit(main())
