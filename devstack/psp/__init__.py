"""A local Stripe-compatible PSP emulator: the subset of Stripe's HTTP API the product uses.

Run it with ``python -m devstack.psp --port 12111 --webhook-url URL --webhook-secret whsec_...``
and point the real ``stripe`` SDK at it (``StripeClient(key, base_addresses={"api": url})``).
``docs/psp-emulator.md`` lists the endpoints, the test payment methods and the test knobs.
"""

from devstack.psp.app import create_app
from devstack.psp.state import EmulatorState

__all__ = ["EmulatorState", "create_app"]
