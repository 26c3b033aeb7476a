"""Feature flags through OpenFeature (``openfeature-sdk``), with a file and environment provider.

Every flag the product reads is in :data:`FLAGS` with its default. Values come, in this order of
precedence, from an environment variable ``FLAG_<NAME>`` (the name upper-cased, ``.`` and ``-`` as
``_``; ``true``/``false``), then the JSON file ``FEATURE_FLAGS_FILE`` (``{"name": true, ...}``),
then the default. :func:`configure` builds OpenFeature's in-memory provider from them once per
process (the API's lifespan, the worker's start); code asks :func:`enabled`. Another provider
(flagd, a vendor's) is one ``api.set_provider`` call away: the code reads flags only through the
OpenFeature client. Unknown names in the file or a value that is not a boolean refuse to start.

The flags (docs/operations.md "Feature flags"):
- ``payment-methods.save``: tenants (and operators) may save a payment method
  (``POST /v1/tenants/{id}/payment-method``); off: 404 ``feature_disabled``. Each new kind of
  payment method is rolled out behind a flag of its own named ``payment-methods.<kind>``.
- ``dunning.campaign-selection``: dunning picks the tenant's or its plan's campaign; off: every
  tenant gets the default campaign (a ``default`` row, else the settings').
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from openfeature import api
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider

PAYMENT_METHODS_SAVE = "payment-methods.save"
DUNNING_CAMPAIGN_SELECTION = "dunning.campaign-selection"

FLAGS: dict[str, bool] = {
    PAYMENT_METHODS_SAVE: True,
    DUNNING_CAMPAIGN_SELECTION: True,
}

DOMAIN = "roomly-billing"


class FlagError(ValueError):
    """A flag file or variable that names an unknown flag or holds something other than a boolean."""


def env_name(flag: str) -> str:
    return "FLAG_" + flag.upper().replace(".", "_").replace("-", "_")


def _boolean(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise FlagError(f"{where} must be true or false, got {value!r}")


def resolve(file: Path | None, environ: Mapping[str, str]) -> dict[str, bool]:
    """Each flag's value: its environment variable, else the file, else its default."""
    values = dict(FLAGS)
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise FlagError(f"FEATURE_FLAGS_FILE {file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise FlagError(f"FEATURE_FLAGS_FILE {file} must hold a JSON object of flag names")
        unknown = sorted(set(loaded) - set(FLAGS))
        if unknown:
            raise FlagError(f"FEATURE_FLAGS_FILE {file} names unknown flags: {', '.join(unknown)}")
        values.update({name: _boolean(value, f"flag {name} in {file}") for name, value in loaded.items()})
    for name in FLAGS:
        if (raw := environ.get(env_name(name))) is not None:
            values[name] = _boolean(raw, env_name(name))
    return values


def configure(file: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, bool]:
    """Install the provider for this process from the file and the environment; the values."""
    values = resolve(file, os.environ if environ is None else environ)
    flags = {name: InMemoryFlag("on" if value else "off", {"on": True, "off": False}) for name, value in values.items()}
    api.set_provider(InMemoryProvider(flags), domain=DOMAIN)
    return values


def enabled(flag: str) -> bool:
    """The flag's value (its default when no provider was configured, e.g. in a bare test)."""
    return api.get_client(domain=DOMAIN).get_boolean_value(flag, FLAGS[flag])
