"""Access tokens and their keys: forgeries refused by ``verify_access_token``, the JWKS, key
rotation with a clock the test moves, key sources, and settings that refuse placeholders."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from adapters.signing_keys import (
    MANIFEST,
    RETIRED_KEY_GRACE,
    KeyConfigError,
    KeySet,
    KeyStore,
    SigningKey,
    load_directory,
    new_private_key,
    thumbprint,
)
from api.main import create_app
from core.principal import Role
from core.settings import Settings
from devstack import keys as keys_cli
from services import auth
from services.errors import InvalidToken
from services.tokens import issue_access_token, verify_access_token
from tests.test_auth import PASSWORD, Clock, a_user, app_client, login, me

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
TENANT = uuid.UUID("6f1d3c52-8a51-4b0c-9a55-3c1b6c0e2f10")
SESSION = uuid.UUID("0b7e2d0e-2b1e-4f4e-8d7e-1c2a3b4c5d6e")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def key_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def keyset(key_settings: Settings) -> KeySet:
    return KeyStore.open(key_settings, NOW).keyset()


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "roomly-billing",
        "aud": "roomly-billing-api",
        "sub": "a6c1f1de-5d0e-4a8e-9a0c-2f3e4d5c6b7a",
        "kind": "user",
        "roles": ["tenant_admin"],
        "tenant_id": str(TENANT),
        "sid": str(SESSION),
        "iat": int(NOW.timestamp()),
        "exp": int(NOW.timestamp()) + 600,
        "jti": "f" * 32,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def signed(key: SigningKey, body: dict[str, Any], **header: Any) -> str:
    return jwt.encode(body, key.private_key, algorithm="ES256", headers={"kid": key.kid, "typ": "at+jwt", **header})


def refused(token: str, keyset: KeySet, settings: Settings, now: datetime = NOW) -> str:
    with pytest.raises(InvalidToken) as error:
        verify_access_token(token, keyset, settings, now=now)
    return error.value.message


def test_a_token_we_issue_verifies_to_its_principal(keyset, key_settings):
    token = issue_access_token(
        keyset, key_settings, subject="u-1", kind="user", role=Role.tenant_member,
        tenant_id=TENANT, session_id=SESSION, now=NOW,
    )  # fmt: skip
    principal = verify_access_token(token.token, keyset, key_settings, now=NOW + timedelta(seconds=599))
    assert (principal.subject, principal.kind, principal.roles) == ("u-1", "user", frozenset({"tenant_member"}))
    assert (principal.tenant_id, principal.session_id) == (TENANT, SESSION)
    # By hand-written claims too, so issuing and verifying do not merely agree with each other.
    assert verify_access_token(signed(keyset.current, claims()), keyset, key_settings, now=NOW).tenant_id == TENANT


def test_alg_none_is_refused(keyset, key_settings):
    header = b64(json.dumps({"alg": "none", "kid": keyset.current.kid, "typ": "at+jwt"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    assert "algorithm not allowed" in refused(token, keyset, key_settings)


def test_hs256_signed_with_the_public_key_is_refused(keyset, key_settings):
    public_pem = keyset.current.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = b64(json.dumps({"alg": "HS256", "kid": keyset.current.kid, "typ": "at+jwt"}).encode())
    signing_input = f"{head}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert "algorithm not allowed" in refused(f"{signing_input}.{b64(mac)}", keyset, key_settings)


def test_an_unknown_kid_and_a_missing_kid_are_refused(keyset, key_settings):
    stranger = new_private_key()
    outsider = SigningKey(thumbprint(stranger.public_key()), stranger)
    assert refused(signed(outsider, claims()), keyset, key_settings) == "unknown signing key"
    no_kid = jwt.encode(claims(), keyset.current.private_key, algorithm="ES256", headers={"typ": "at+jwt"})
    assert refused(no_kid, keyset, key_settings) == "unknown signing key"


def test_a_bad_signature_is_refused(keyset, key_settings):
    stranger = new_private_key()
    forged = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": keyset.current.kid, "typ": "at+jwt"})
    assert refused(forged, keyset, key_settings) == "bad signature"
    head, _body, signature = signed(keyset.current, claims()).split(".")
    tampered = b64(json.dumps(claims(roles=["operator_admin"], tenant_id=None)).encode())
    assert refused(f"{head}.{tampered}.{signature}", keyset, key_settings) == "bad signature"


def test_an_expired_token_is_refused(keyset, key_settings):
    token = signed(keyset.current, claims())
    assert verify_access_token(token, keyset, key_settings, now=NOW + timedelta(seconds=599)).subject
    assert refused(token, keyset, key_settings, NOW + timedelta(seconds=600)) == "token expired"
    assert refused(signed(keyset.current, claims(iat=int(NOW.timestamp()) + 3600, exp=int(NOW.timestamp()) + 4200)),
                   keyset, key_settings) == "token issued in the future"  # fmt: skip


def test_wrong_audience_issuer_and_type_are_refused(keyset, key_settings):
    assert "audience" in refused(signed(keyset.current, claims(aud="another-api")), keyset, key_settings).lower()
    assert "issuer" in refused(signed(keyset.current, claims(iss="someone-else")), keyset, key_settings)
    assert "typ" in refused(signed(keyset.current, claims(), typ="JWT"), keyset, key_settings)


@pytest.mark.parametrize("name", ["iss", "aud", "sub", "kind", "roles", "iat", "exp", "jti"])
def test_a_token_missing_a_claim_is_refused(keyset, key_settings, name):
    refused(signed(keyset.current, claims(**{name: ...})), keyset, key_settings)


@pytest.mark.parametrize(
    "changes",
    [
        {"roles": ["superuser"]},
        {"roles": []},
        {"kind": "robot"},
        {"tenant_id": None},  # a tenant role without its tenant
        {"roles": ["operator"]},  # an operator role with a tenant
        {"sid": None},  # a user without a session
        {"tenant_id": "not-a-uuid"},
        {"exp": "tomorrow"},
    ],
)
def test_claims_of_the_wrong_shape_are_refused(keyset, key_settings, changes):
    refused(signed(keyset.current, claims(**changes)), keyset, key_settings)


def test_the_jwks_is_computed_like_any_other_library_would(keyset, key_settings):
    (published,) = keyset.jwks(NOW, key_settings.auth_access_ttl)["keys"]
    theirs = json.loads(ECAlgorithm.to_jwk(keyset.current.public_key))
    assert (published["x"], published["y"], published["crv"], published["kty"]) == (
        theirs["x"],
        theirs["y"],
        "P-256",
        "EC",
    )
    assert (published["use"], published["alg"]) == ("sig", "ES256")
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{theirs["x"]}","y":"{theirs["y"]}"}}'  # RFC 7638 section 3
    assert published["kid"] == b64(hashlib.sha256(canonical.encode()).digest())


def test_a_missing_key_directory_is_created_only_in_local_and_test(tmp_path):
    local = KeyStore.open(Settings(data_dir=tmp_path), NOW).keyset()
    directory = tmp_path / "keys"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / f"{local.current_kid}.pem").stat().st_mode) == 0o600
    assert load_directory(directory).current_kid == local.current_kid  # reopened, not made again
    assert KeyStore.open(Settings(data_dir=tmp_path), NOW).keyset().current_kid == local.current_kid
    for environment in ("staging", "production"):
        with pytest.raises(KeyConfigError, match=r"AUTH_KEYS_DIR: .* does not exist"):
            KeyStore.open(production(environment=environment, data_dir=tmp_path / environment), NOW)
        assert not (tmp_path / environment / "keys").exists()


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def test_a_key_from_the_environment_or_a_mounted_file(tmp_path):
    private_key = ec.generate_private_key(ec.SECP256R1())
    from_env = KeyStore.open(Settings(data_dir=tmp_path, auth_signing_key_pem=_pem(private_key)), NOW).keyset()
    assert from_env.current_kid == thumbprint(private_key.public_key()) and len(from_env.keys) == 1
    mounted = tmp_path / "signing.pem"
    mounted.write_text(_pem(private_key))
    from_file = KeyStore.open(Settings(data_dir=tmp_path, auth_signing_key_file=mounted), NOW).keyset()
    assert from_file.current_kid == from_env.current_kid
    assert not (tmp_path / "keys").exists()  # no key directory was made
    with pytest.raises(KeyConfigError, match="AUTH_SIGNING_KEY_PEM: not an unencrypted PEM"):
        KeyStore.open(Settings(data_dir=tmp_path, auth_signing_key_pem="-----BEGIN nonsense"), NOW)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeyConfigError, match="AUTH_SIGNING_KEY_PEM: the signing key must be an EC P-256"):
        KeyStore.open(Settings(data_dir=tmp_path, auth_signing_key_pem=_pem(rsa_key)), NOW)
    with pytest.raises(KeyConfigError, match="AUTH_SIGNING_KEY_FILE"):
        KeyStore.open(Settings(data_dir=tmp_path, auth_signing_key_file=tmp_path / "absent.pem"), NOW)


def test_a_tampered_manifest_is_refused(tmp_path):
    directory = tmp_path / "keys"
    keyset = KeyStore.open(Settings(data_dir=tmp_path), NOW).keyset()
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["keys"][0]["file"] = "../../etc/passwd"
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KeyConfigError, match="plain file name"):
        load_directory(directory)
    manifest["keys"][0].update(file=f"{keyset.current_kid}.pem", kid="someone-elses-kid")
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KeyConfigError, match="is not the thumbprint"):
        load_directory(directory)


def production(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "production",
        "database_url": "postgresql://db/x",
        "temporal_address": "t:7233",
        "issuer_name": "Roomly Rooms AG",
        "issuer_address": "Bahnhofstrasse 1",
        "issuer_tax_id": "CHE-123.456.789",
        "stripe_api_key": "sk_live_a_real_one",
        "stripe_webhook_secret": "whsec_a_real_one",
        "smtp_host": "smtp.internal",
        "smtp_from": "Roomly <billing@roomly.example>",
    }
    values.update(changes)
    return Settings(**values)


def test_placeholder_secrets_are_refused_outside_local_and_test():
    assert production().environment == "production"
    for name, value in [
        ("auth_signing_key_pem", "change-me"),
        ("smtp_password", "dev-secret"),
        ("stripe_api_key", "CHANGE-ME"),
        ("stripe_webhook_secret", "placeholder"),
    ]:
        with pytest.raises(ValueError, match=f"{name.upper()}: a placeholder secret is refused"):
            production(**{name: value})
    with pytest.raises(ValueError, match="STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET: a placeholder secret is refused"):
        production(
            environment="staging", stripe_api_key="sk_test_local_emulator", stripe_webhook_secret="whsec_local_emulator"
        )
    with pytest.raises(ValueError, match="AUTH_SIGNING_KEY_PEM or AUTH_SIGNING_KEY_FILE, not both"):
        production(auth_signing_key_pem="-----BEGIN", auth_signing_key_file="/run/secrets/key.pem")
    # In local and test the same values are fine (the emulator's defaults, a developer's secret).
    assert Settings(environment="test", smtp_password="dev-secret", auth_signing_key_pem="change-me").smtp_password
    with pytest.raises(ValueError, match="auth_rate_limit"):
        Settings(auth_rate_limit="10 per minute")


async def test_production_without_a_key_refuses_to_start(tmp_path, temporal_env):
    app = create_app(production(data_dir=tmp_path), temporal_client=temporal_env.client)
    with pytest.raises(KeyConfigError, match="AUTH_KEYS_DIR"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.db
async def test_key_rotation_keeps_old_tokens_valid_until_they_expire(sessions, settings, temporal_env):
    """One command rotates; the running API signs with the new key at once (no restart); a token of
    the old key keeps working until it expires; the JWKS lists both until the old key's last token
    is past, then only the new one."""
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    await a_user(sessions)
    auth_settings = settings.model_copy(update={"auth_revocation_cache_seconds": 0.0, "auth_rate_limit": "1000/60"})
    async with app_client(auth_settings, temporal_env, clock) as api:
        old_token = (await login(api))["access_token"]
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        assert [k["kid"] for k in (await api.get("/.well-known/jwks.json")).json()["keys"]] == [old_kid]

        clock.advance(60)
        assert keys_cli.main(["rotate"], settings=auth_settings, now=clock()) == 0
        rotated_at = clock()
        new_token = (await login(api))["access_token"]
        new_kid = jwt.get_unverified_header(new_token)["kid"]
        assert new_kid != old_kid
        jwks = await api.get("/.well-known/jwks.json")
        assert jwks.headers["cache-control"] == "public, max-age=60"
        assert sorted(k["kid"] for k in jwks.json()["keys"]) == sorted([old_kid, new_kid])

        clock.advance(539)  # the old token was issued 599 s ago: still valid
        assert (await me(api, old_token)).status_code == 200
        clock.advance(1)
        expired = await me(api, old_token)
        assert expired.status_code == 401 and expired.json()["errors"][0]["message"] == "token expired"
        assert (await me(api, new_token)).status_code == 200

        # The old key is still published while a token it signed just before the rotation may live.
        until = rotated_at + timedelta(seconds=auth_settings.auth_access_ttl) + RETIRED_KEY_GRACE
        clock.now = until - timedelta(seconds=1)
        assert len((await api.get("/.well-known/jwks.json")).json()["keys"]) == 2
        clock.now = until
        assert [k["kid"] for k in (await api.get("/.well-known/jwks.json")).json()["keys"]] == [new_kid]
        # From now on even a fresh token of the old key is refused: the key is gone.
        old_key = next(k for k in load_directory(auth_settings.auth_keys_root).keys if k.kid == old_kid)
        late = issue_access_token(
            KeySet((old_key,), old_kid), auth_settings, subject="x", kind="client", role=Role.operator,
            tenant_id=None, session_id=None, now=clock(),
        )  # fmt: skip
        late_answer = await me(api, late.token)
        assert late_answer.status_code == 401 and late_answer.json()["errors"][0]["message"] == "unknown signing key"

        # The next rotation prunes the expired key from the manifest and the disk.
        assert keys_cli.main(["rotate"], settings=auth_settings, now=clock()) == 0
        directory = auth_settings.auth_keys_root
        assert old_kid not in {k.kid for k in load_directory(directory).keys}
        assert not (directory / f"{old_kid}.pem").exists() and (directory / f"{new_kid}.pem").exists()


def test_a_broken_manifest_keeps_the_keys_a_process_has(tmp_path):
    settings = Settings(data_dir=tmp_path)
    store = KeyStore.open(settings, NOW)
    before = store.keyset().current_kid
    manifest = tmp_path / "keys" / MANIFEST
    manifest.write_text("{not json")
    os.utime(manifest, ns=(1, 1))
    assert store.keyset().current_kid == before
    assert keys_cli.main(["rotate"], settings=settings, now=NOW) == 1  # refuses to read the broken manifest
    assert store.keyset().current_kid == before


def test_the_keys_command_lists_and_refuses_env_keys(tmp_path, capsys):
    settings = Settings(data_dir=tmp_path)
    assert keys_cli.main(["rotate"], settings=settings, now=NOW) == 0
    assert keys_cli.main(["rotate"], settings=settings, now=NOW + timedelta(seconds=10)) == 0
    capsys.readouterr()
    assert keys_cli.main(["list"], settings=settings, now=NOW + timedelta(seconds=20)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("retired, verifies until 2026-12-05T09:11:10Z")
    assert lines[1].endswith("current")
    pem = Settings(data_dir=tmp_path, auth_signing_key_pem=_pem(ec.generate_private_key(ec.SECP256R1())))
    assert keys_cli.main(["rotate"], settings=pem, now=NOW) == 2


@pytest.mark.db
async def test_the_users_command_creates_accounts(sessions, settings, capsys, monkeypatch):
    import io

    from devstack import users as users_cli

    cli_settings = settings
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    code = await _in_thread(
        users_cli.main,
        ["create-user", "--email", "Op@Example.com", "--role", "operator", "--password-stdin"],
        cli_settings,
    )
    assert code == 0 and "user op@example.com (operator)" in capsys.readouterr().out
    assert (
        await _in_thread(
            users_cli.main, ["create-user", "--email", "x@example.com", "--role", "tenant_admin"], cli_settings
        )
        == 1
    )
    assert capsys.readouterr().err.strip() == "tenant_id: role tenant_admin needs a tenant"
    code = await _in_thread(
        users_cli.main, ["create-client", "--client-id", "gw-9", "--name", "GW", "--role", "operator"], cli_settings
    )
    secret = capsys.readouterr().out.split("client_secret: ")[1].strip()
    assert code == 0 and len(secret) >= 40
    keyset = KeyStore.open(settings, NOW).keyset()
    async with sessions() as s:
        tokens = await auth.login_client(s, keyset, settings, client_id="gw-9", client_secret=secret, now=NOW)
        assert tokens.refresh_token is None
        assert (
            await auth.login_password(s, keyset, settings, username="op@example.com", password=PASSWORD, now=NOW)
        ).refresh_token


async def _in_thread(main: Any, argv: list[str], settings: Settings) -> int:
    """The command runs its own event loop, as it does from a shell."""
    import asyncio

    result: int = await asyncio.to_thread(main, argv, settings=settings)
    return result
