"""Run the PSP emulator: ``python -m devstack.psp --port 12111 --webhook-url URL --webhook-secret S``."""

from __future__ import annotations

import argparse

import uvicorn

from devstack.psp.app import create_app
from devstack.psp.state import EVENT_TYPES, EmulatorState


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.psp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", help="where signed events are POSTed (none: events are only stored)")
    parser.add_argument("--webhook-secret", help="the endpoint's signing secret, e.g. whsec_...")
    parser.add_argument(
        "--enabled-events",
        default="*",
        help=f"comma-separated event types to deliver, or * (default); known: {', '.join(EVENT_TYPES)}",
    )
    parser.add_argument("--available-after", type=float, default=0.0, help="seconds a charge's funds stay pending")
    parser.add_argument("--max-attempts", type=int, default=5, help="webhook delivery attempts per event")
    parser.add_argument("--retry-base", type=float, default=1.0, help="first webhook retry delay, doubled each time")
    args = parser.parse_args(argv)
    if bool(args.webhook_url) != bool(args.webhook_secret):
        parser.error("--webhook-url and --webhook-secret go together")
    app = create_app(
        EmulatorState(available_after=args.available_after),
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        enabled_events=tuple(e.strip() for e in args.enabled_events.split(",") if e.strip()),
        max_attempts=args.max_attempts,
        retry_base=args.retry_base,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
