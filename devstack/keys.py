"""Signing keys of access tokens, from the command line (docs/security.md "Keys and rotation").

    .venv/bin/python -m devstack.keys rotate [--dir DIR]   # add a key, make it current, retire the last one
    .venv/bin/python -m devstack.keys list   [--dir DIR]   # the keys, which one signs, until when each verifies

``DIR`` defaults to ``AUTH_KEYS_DIR`` (``DATA_DIR/keys``). A running API notices the new manifest
on its next request and signs with the new key; the retired key stays in the JWKS and verifies
until ``retired_at + AUTH_ACCESS_TTL`` (+ a minute of grace), when the last token it signed has
expired. Operators and the Helm chart's Job run the same command (beside ``devstack.search_attributes``):
it needs only the settings and the directory, no database and no Temporal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from adapters.signing_keys import KeyConfigError, load_directory, rotate
from core.settings import Settings, get_settings


def _directory(settings: Settings, given: str | None) -> Path:
    return Path(given) if given else settings.auth_keys_root


def main(argv: Sequence[str] | None = None, *, settings: Settings | None = None, now: datetime | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.keys", description="Manage the token signing keys.")
    parser.add_argument("command", choices=("rotate", "list"))
    parser.add_argument("--dir", help="the key directory (default AUTH_KEYS_DIR, else DATA_DIR/keys)")
    args = parser.parse_args(argv)
    settings = settings or get_settings()
    now = now or datetime.now(UTC)
    if settings.auth_signing_key_pem is not None or settings.auth_signing_key_file is not None:
        print("the API signs with AUTH_SIGNING_KEY_PEM / AUTH_SIGNING_KEY_FILE, not a key directory:", file=sys.stderr)
        print("rotate by deploying another key there (or unset it and use AUTH_KEYS_DIR)", file=sys.stderr)
        return 2
    directory = _directory(settings, args.dir)
    try:
        if args.command == "rotate":
            key = rotate(directory, now, settings.auth_access_ttl)
            print(f"current signing key {key.kid} in {directory}")
            return 0
        keyset = load_directory(directory)
    except KeyConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    for key in keyset.keys:
        until = key.accepted_until(settings.auth_access_ttl)
        if until is None:
            state = "current" if key.kid == keyset.current_kid else "not retired"
        elif until <= now:
            state = "retired, no longer verifies"
        else:
            state = f"retired, verifies until {until.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
        print(f"{key.kid}  {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
