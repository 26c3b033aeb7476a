"""The keys that sign access tokens: EC P-256 (ES256), each named by its ``kid``.

Two sources, chosen by the settings:

- **a key directory** (``AUTH_KEYS_DIR``, default ``DATA_DIR/keys``): one PKCS#8 PEM file per key
  and ``manifest.json`` naming the current key and when each earlier one was retired::

      {"current": "<kid>", "keys": [{"kid": "<kid>", "file": "<kid>.pem",
                                     "created_at": "2026-12-05T09:00:00Z", "retired_at": null}]}

  :func:`rotate` adds a key, makes it current and stamps the previous one's ``retired_at``. A
  retired key is still published and accepted until ``retired_at + AUTH_ACCESS_TTL +
  RETIRED_KEY_GRACE`` (the last token it signed has expired by then), then drops out. A
  :class:`KeyStore` reads the manifest again whenever the file changes, so a running API picks up
  a rotation without a restart. In local and test environments a missing directory is created
  with a first key; elsewhere a missing or unreadable key refuses to start.
- **one key from the environment** (``AUTH_SIGNING_KEY_PEM``, or ``AUTH_SIGNING_KEY_FILE`` naming a
  mounted file): that key alone, never retired; rotating it means deploying another (tokens of the
  old key are then refused and clients refresh).

The ``kid`` is the key's RFC 7638 JWK thumbprint, so every replica names a key the same way.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core.settings import Settings

ALGORITHM = "ES256"
MANIFEST = "manifest.json"
LOCK_FILE = ".rotate.lock"
# Slack after a retired key's last token expired (clock skew between hosts, a mounted secret that
# reaches replicas a little later): only then does the key leave the JWKS.
RETIRED_KEY_GRACE = timedelta(seconds=60)

log = structlog.stdlib.get_logger("auth")


class KeyConfigError(RuntimeError):
    """The signing keys cannot be used; the message names the setting or file at fault."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _coordinates(public_key: ec.EllipticCurvePublicKey) -> tuple[str, str]:
    numbers = public_key.public_numbers()
    return _b64url(numbers.x.to_bytes(32, "big")), _b64url(numbers.y.to_bytes(32, "big"))


def thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): the required members, sorted, no whitespace."""
    x, y = _coordinates(public_key)
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    created_at: datetime | None = None
    retired_at: datetime | None = None
    algorithm: str = ALGORITHM

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, str]:
        x, y = _coordinates(self.public_key)
        return {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def accepted_until(self, access_ttl: int) -> datetime | None:
        """When this key stops being published and accepted (None: while it is not retired)."""
        if self.retired_at is None:
            return None
        return self.retired_at + timedelta(seconds=access_ttl) + RETIRED_KEY_GRACE


@dataclass(frozen=True)
class KeySet:
    """The keys at one moment: the current one signs, every key not past its time verifies."""

    keys: tuple[SigningKey, ...]
    current_kid: str

    @property
    def current(self) -> SigningKey:
        return next(k for k in self.keys if k.kid == self.current_kid)

    def accepted(self, now: datetime, access_ttl: int) -> list[SigningKey]:
        return [k for k in self.keys if (until := k.accepted_until(access_ttl)) is None or now < until]

    def find(self, kid: str, now: datetime, access_ttl: int) -> SigningKey | None:
        return next((k for k in self.accepted(now, access_ttl) if k.kid == kid), None)

    def jwks(self, now: datetime, access_ttl: int) -> dict[str, list[dict[str, str]]]:
        return {"keys": [k.jwk() for k in self.accepted(now, access_ttl)]}


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_private_key(pem: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted EC P-256 private key from PEM; :class:`KeyConfigError` naming ``source`` otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyConfigError(f"{source}: the signing key must be an EC P-256 key (ES256)")
    return key


def _timestamp(value: object, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeyConfigError(f"{where}: expected an RFC 3339 time or null")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise KeyConfigError(f"{where}: {value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise KeyConfigError(f"{where}: {value!r} has no time zone")
    return parsed


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def load_directory(directory: Path) -> KeySet:
    """The key set described by ``directory/manifest.json`` (every listed file read and checked)."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise KeyConfigError(
            f"AUTH_KEYS_DIR: {manifest_path} does not exist; create the first key with `python -m devstack.keys rotate`"
        ) from None
    except (OSError, ValueError) as exc:
        raise KeyConfigError(f"AUTH_KEYS_DIR: {manifest_path} cannot be read ({exc})") from None
    entries = manifest.get("keys") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not entries:
        raise KeyConfigError(f"AUTH_KEYS_DIR: {manifest_path} lists no keys")
    keys = []
    for index, entry in enumerate(entries):
        where = f"AUTH_KEYS_DIR: {manifest_path} keys[{index}]"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(n), str) for n in ("kid", "file")):
            raise KeyConfigError(f"{where}: needs kid and file")
        name = entry["file"]
        if Path(name).name != name or name.startswith("."):
            raise KeyConfigError(f"{where}: file must be a plain file name inside the directory")
        try:
            pem = (directory / name).read_bytes()
        except OSError as exc:
            raise KeyConfigError(f"{where}: {exc}") from None
        private_key = parse_private_key(pem, f"{where} ({name})")
        kid = thumbprint(private_key.public_key())
        if kid != entry["kid"]:
            raise KeyConfigError(f"{where}: kid {entry['kid']!r} is not the thumbprint of {name} ({kid})")
        created = _timestamp(entry.get("created_at"), f"{where}.created_at")
        retired = _timestamp(entry.get("retired_at"), f"{where}.retired_at")
        keys.append(SigningKey(kid, private_key, created, retired))
    current = manifest.get("current")
    chosen = [k for k in keys if k.kid == current]
    if not chosen:
        raise KeyConfigError(f"AUTH_KEYS_DIR: {manifest_path}: current {current!r} is not one of its keys")
    if chosen[0].retired_at is not None:
        raise KeyConfigError(f"AUTH_KEYS_DIR: {manifest_path}: the current key {current} is retired")
    return KeySet(tuple(keys), chosen[0].kid)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One rotation at a time in ``directory`` (an exclusive lock on a file inside it)."""
    with open(directory / LOCK_FILE, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def rotate(directory: Path, now: datetime, access_ttl: int) -> SigningKey:
    """Add a key and make it current; the previous current key is retired at ``now``. Keys whose
    time is over (``retired_at + access_ttl + RETIRED_KEY_GRACE``) leave the manifest and their
    files are removed. Creates ``directory`` (mode 0700) and its first key when it has none."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(directory):
        existing: list[SigningKey] = []
        if (directory / MANIFEST).exists():
            existing = list(load_directory(directory).keys)
        private_key = new_private_key()
        key = SigningKey(thumbprint(private_key.public_key()), private_key, created_at=now)
        _write_atomically(directory / f"{key.kid}.pem", _pem(private_key), 0o600)
        kept: list[SigningKey] = []
        dropped: list[SigningKey] = []
        for old in existing:
            retired = old if old.retired_at is not None else SigningKey(old.kid, old.private_key, old.created_at, now)
            until = retired.accepted_until(access_ttl)
            (dropped if until is not None and until <= now else kept).append(retired)
        entries: list[dict[str, Any]] = [
            {"kid": k.kid, "file": f"{k.kid}.pem", "created_at": _iso(k.created_at), "retired_at": _iso(k.retired_at)}
            for k in [*kept, key]
        ]
        manifest = {"current": key.kid, "keys": entries}
        _write_atomically(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), 0o600)
        for old in dropped:
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{old.kid}.pem").unlink()
    log.info("signing key rotated", kid=key.kid, retired=[k.kid for k in existing if k.retired_at is None])
    return key


def _manifest_version(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_ino, stat.st_size)


class KeyStore:
    """The signing keys of a running process: :meth:`keyset` gives the current :class:`KeySet`,
    read again from the directory when its manifest has changed (a rotation by another process)."""

    def __init__(self, keyset: KeySet, directory: Path | None = None) -> None:
        self._keyset = keyset
        self._directory = directory
        self._version = _manifest_version(directory / MANIFEST) if directory is not None else None

    @classmethod
    def open(cls, settings: Settings, now: datetime) -> KeyStore:
        """The keys the settings name. In local/test a missing key directory gets a first key; in
        any other environment a missing or unusable key raises :class:`KeyConfigError`."""
        if settings.auth_signing_key_pem is not None:
            pem = settings.auth_signing_key_pem.get_secret_value().encode()
            return cls(_single(parse_private_key(pem, "AUTH_SIGNING_KEY_PEM")))
        if settings.auth_signing_key_file is not None:
            try:
                pem = settings.auth_signing_key_file.read_bytes()
            except OSError as exc:
                raise KeyConfigError(f"AUTH_SIGNING_KEY_FILE: {exc}") from None
            return cls(_single(parse_private_key(pem, f"AUTH_SIGNING_KEY_FILE ({settings.auth_signing_key_file})")))
        directory = settings.auth_keys_root
        if not (directory / MANIFEST).exists() and settings.environment.generates_secrets:
            key = rotate(directory, now, settings.auth_access_ttl)
            log.info("signing key created", kid=key.kid, directory=str(directory))
        return cls(load_directory(directory), directory)

    def keyset(self) -> KeySet:
        if self._directory is not None:
            version = _manifest_version(self._directory / MANIFEST)
            if version != self._version:
                try:
                    self._keyset = load_directory(self._directory)
                except KeyConfigError as exc:  # keep signing with what we had; say so loudly
                    log.error("signing keys not reloaded", error=str(exc))
                else:
                    log.info("signing keys reloaded", current=self._keyset.current_kid)
                self._version = version
        return self._keyset


def _single(private_key: ec.EllipticCurvePrivateKey) -> KeySet:
    key = SigningKey(thumbprint(private_key.public_key()), private_key)
    return KeySet((key,), key.kid)
