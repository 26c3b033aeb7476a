"""Logins, refresh rotation, reuse detection, logout, revocation and rate limits, through the real
app (ASGI) on the test's PostgreSQL; time is a clock the test moves, never a sleep."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.main import create_app
from core.principal import Role
from core.settings import Settings
from schema.models import RefreshToken, User
from services import auth
from services.errors import Conflict, InvalidInput, Unauthenticated
from tests.test_api_support import error_locs

pytestmark = pytest.mark.db

PASSWORD = "correct horse battery staple"
ADDRESS = ("203.0.113.7", 50000)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    # No revocation cache (its own test below) and a limit the functional tests never reach.
    return settings.model_copy(update={"auth_revocation_cache_seconds": 0.0, "auth_rate_limit": "1000/60"})


@asynccontextmanager
async def app_client(
    settings: Settings, temporal_env: Any, clock: Clock, address: tuple[str, int] = ADDRESS
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, temporal_client=temporal_env.client, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=address)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client


@pytest_asyncio.fixture
async def api(sessions, auth_settings, temporal_env, clock) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(auth_settings, temporal_env, clock) as client:
        yield client


async def a_tenant(sessions) -> uuid.UUID:
    async with sessions() as s:
        tenant_id = uuid.uuid4()
        await (await s.connection()).execute(
            text(
                "INSERT INTO tenants (id, name, email, currency, timezone, created_at)"
                " VALUES (:id, 'Ada', 'ada@example.com', 'EUR', 'UTC', now())"
            ),
            {"id": tenant_id},
        )
        await s.commit()
    return tenant_id


async def a_user(sessions, email: str = "ada@example.com", role: Role = Role.operator, tenant_id=None) -> User:
    async with sessions() as s:
        return await auth.create_user(s, email=email, password=PASSWORD, role=role, tenant_id=tenant_id)


def password_form(username: str = "ada@example.com", password: str = PASSWORD) -> dict[str, str]:
    return {"grant_type": "password", "username": username, "password": password}


async def login(api: httpx.AsyncClient, **form: str) -> dict[str, Any]:
    response = await api.post("/v1/auth/token", data=form or password_form())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def me(api: httpx.AsyncClient, access_token: str) -> httpx.Response:
    return await api.get("/v1/auth/me", headers={"Authorization": f"Bearer {access_token}"})


async def test_password_login_gives_an_access_and_a_refresh_token(api, sessions):
    tenant_id = await a_tenant(sessions)
    user = await a_user(sessions, "Ada@Example.com", Role.tenant_admin, tenant_id)
    response = await api.post("/v1/auth/token", data=password_form("ADA@example.COM"))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 600 and len(body["refresh_token"]) >= 40
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "ES256" and header["typ"] == "at+jwt"
    assert header["kid"] in [k["kid"] for k in (await api.get("/.well-known/jwks.json")).json()["keys"]]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "roomly-billing-api" and claims["iss"] == "roomly-billing"
    assert claims["exp"] - claims["iat"] == 600 and claims["roles"] == ["tenant_admin"]
    who = await me(api, body["access_token"])
    assert who.status_code == 200, who.text
    found = who.json()
    assert found["subject"] == str(user.id) and found["kind"] == "user" and found["roles"] == ["tenant_admin"]
    assert found["tenant_id"] == str(tenant_id) and found["session_id"] == claims["sid"]
    async with sessions() as s:
        stored = (await s.exec(select(RefreshToken))).all()
    assert [str(r.family_id) for r in stored] == [claims["sid"]]
    assert body["refresh_token"] not in {r.token_hash for r in stored}  # only its hash is kept


async def test_client_credentials_give_an_access_token_only(api, sessions):
    async with sessions() as s:
        _, secret = await auth.create_client(s, client_id="gateway-1", name="Gateway", role=Role.operator)
    body = await login(api, grant_type="client_credentials", client_id="gateway-1", client_secret=secret)
    assert set(body) == {"access_token", "token_type", "expires_in"}
    found = (await me(api, body["access_token"])).json()
    assert found == {
        "subject": "gateway-1",
        "kind": "client",
        "roles": ["operator"],
        "tenant_id": None,
        "session_id": None,
    }
    wrong = await api.post(
        "/v1/auth/token", data={"grant_type": "client_credentials", "client_id": "gateway-1", "client_secret": "x" * 43}
    )
    unknown = await api.post(
        "/v1/auth/token", data={"grant_type": "client_credentials", "client_id": "nobody", "client_secret": secret}
    )
    assert wrong.status_code == unknown.status_code == 401 and wrong.json() == unknown.json()


async def test_an_unknown_user_and_a_wrong_password_are_indistinguishable(api, sessions):
    await a_user(sessions)
    wrong_times, unknown_times = [], []
    for _ in range(4):
        started = time.perf_counter()
        wrong = await api.post("/v1/auth/token", data=password_form(password="not the password at all"))
        wrong_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        unknown = await api.post("/v1/auth/token", data=password_form(username="nobody@example.com"))
        unknown_times.append(time.perf_counter() - started)
        assert wrong.status_code == unknown.status_code == 401
        assert (
            wrong.json()
            == unknown.json()
            == {"errors": [{"type": "invalid_credentials", "message": auth.BAD_LOGIN, "field": None, "in": None}]}
        )
    # Both verify an argon2id hash (~0.1-0.3 s here); without the dummy hash an unknown user
    # answers in a few milliseconds.
    ratio = statistics.median(unknown_times) / statistics.median(wrong_times)
    assert 0.5 < ratio < 2.0, (wrong_times, unknown_times)


async def test_a_disabled_user_cannot_log_in(api, sessions):
    user = await a_user(sessions)
    async with sessions() as s:
        row = await s.get(User, user.id)
        assert row is not None
        row.disabled_at = datetime.now(UTC)
        s.add(row)
        await s.commit()
    response = await api.post("/v1/auth/token", data=password_form())
    assert response.status_code == 401 and response.json()["errors"][0]["message"] == auth.BAD_LOGIN


async def test_malformed_token_requests_are_422_naming_the_field(api):
    assert error_locs(await api.post("/v1/auth/token", data={"username": "a@b.c", "password": PASSWORD})) == [
        ["body", "grant_type"]
    ]
    assert error_locs(await api.post("/v1/auth/token", data={"grant_type": "password", "username": "a@b.c"})) == [
        ["body", "password"]
    ]
    assert error_locs(await api.post("/v1/auth/token", data={"grant_type": "client_credentials"})) == [
        ["body", "client_id"],
        ["body", "client_secret"],
    ]
    assert error_locs(await api.post("/v1/auth/token", data={"grant_type": "implicit"})) == [["body", "grant_type"]]
    assert error_locs(await api.post("/v1/auth/token", data=password_form(password="p" * 300))) == [
        ["body", "password"]
    ]
    # PostgreSQL cannot store a NUL: refused naming the field before it reaches a query (it was a 500).
    assert error_locs(await api.post("/v1/auth/token", data=password_form(username="a\x00b@example.com"))) == [
        ["body", "username"]
    ]
    nul_client = {"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": PASSWORD}
    assert error_locs(await api.post("/v1/auth/token", data=nul_client)) == [["body", "client_id"]]
    assert error_locs(await api.post("/v1/auth/refresh", json={"refresh_token": "a\x00b"})) == [
        ["body", "refresh_token"]
    ]
    # The token route takes a form, as OAuth 2 has it; a JSON body is not one.
    assert error_locs(await api.post("/v1/auth/token", json=password_form())) == [["body", "grant_type"]]
    assert error_locs(await api.post("/v1/auth/refresh", json={})) == [["body", "refresh_token"]]


async def test_accounts_are_unique_by_email_whatever_its_case_and_roles_match_tenants(sessions):
    tenant_id = await a_tenant(sessions)
    await a_user(sessions, "Grace@Example.com")
    async with sessions() as s:
        with pytest.raises(Conflict) as taken:
            await auth.create_user(s, email="grace@EXAMPLE.com", password=PASSWORD, role=Role.operator)
        assert taken.value.field == "email"
        with pytest.raises(InvalidInput) as no_tenant:
            await auth.create_user(s, email="t@example.com", password=PASSWORD, role=Role.tenant_member)
        with pytest.raises(InvalidInput) as operator_with_tenant:
            await auth.create_user(s, email="o@example.com", password=PASSWORD, role=Role.operator, tenant_id=tenant_id)
        with pytest.raises(InvalidInput) as short:
            await auth.create_user(s, email="s@example.com", password="short", role=Role.operator)
        assert (no_tenant.value.field, operator_with_tenant.value.field, short.value.field) == (
            "tenant_id",
            "tenant_id",
            "password",
        )
    async with sessions() as s:  # and the database refuses the same by itself
        with pytest.raises(IntegrityError):
            await (await s.connection()).execute(
                text(
                    "INSERT INTO users (id, email, password_hash, role, created_at)"
                    " VALUES (gen_random_uuid(), 'Upper@example.com', 'x', 'operator', now())"
                )
            )
    async with sessions() as s:
        with pytest.raises(IntegrityError):
            await (await s.connection()).execute(
                text(
                    "INSERT INTO users (id, email, password_hash, role, created_at)"
                    " VALUES (gen_random_uuid(), 'member@example.com', 'x', 'tenant_member', now())"
                )
            )


async def test_refresh_rotates_within_the_family(api, sessions, clock):
    user = await a_user(sessions)
    first = await login(api)
    clock.advance(30)
    response = await api.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"] and second["access_token"] != first["access_token"]
    sid = jwt.decode(first["access_token"], options={"verify_signature": False})["sid"]
    assert jwt.decode(second["access_token"], options={"verify_signature": False})["sid"] == sid
    assert (await me(api, second["access_token"])).json()["subject"] == str(user.id)
    async with sessions() as s:
        rows = (await s.exec(select(RefreshToken).order_by(col(RefreshToken.issued_at)))).all()
    assert len(rows) == 2 and {str(r.family_id) for r in rows} == {sid}
    old, new = rows
    assert old.used_at == clock.now and new.used_at is None and new.parent_id == old.id
    assert new.expires_at == clock.now + timedelta(days=30)


async def test_a_reused_refresh_token_revokes_the_whole_family(api, sessions):
    await a_user(sessions)
    first = await login(api)
    other_session = await login(api)  # another login of the same user: another family, untouched
    second = (await api.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    assert (await me(api, second["access_token"])).status_code == 200

    reused = await api.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401
    assert reused.json()["errors"][0] == {
        "type": "invalid_grant",
        "message": auth.REUSED_REFRESH,
        "field": "refresh_token",
        "in": "body",
    }
    newest = await api.post("/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert newest.status_code == 401
    for token in (first["access_token"], second["access_token"]):
        refused = await me(api, token)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert (await me(api, other_session["access_token"])).status_code == 200
    assert (
        await api.post("/v1/auth/refresh", json={"refresh_token": other_session["refresh_token"]})
    ).status_code == 200


async def test_concurrent_refreshes_of_one_token_let_exactly_one_win(api, sessions):
    await a_user(sessions)
    first = await login(api)
    answers = await asyncio.gather(
        *(api.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}) for _ in range(5))
    )
    assert sorted(r.status_code for r in answers) == [200, 401, 401, 401, 401]
    # The losers count as reuse: the family is revoked, so the winner's tokens are dead as well.
    winner = next(r.json() for r in answers if r.status_code == 200)
    assert (await api.post("/v1/auth/refresh", json={"refresh_token": winner["refresh_token"]})).status_code == 401
    assert (await me(api, winner["access_token"])).status_code == 401
    async with sessions() as s:
        rows = (await s.exec(select(RefreshToken))).all()
    assert len(rows) == 2 and all(r.revoked_at is not None for r in rows)


async def test_expired_and_unknown_refresh_tokens_are_refused(api, sessions, clock):
    await a_user(sessions)
    first = await login(api)
    unknown = await api.post("/v1/auth/refresh", json={"refresh_token": "not-a-token"})
    assert unknown.status_code == 401 and unknown.json()["errors"][0]["message"] == auth.BAD_REFRESH
    clock.advance(30 * 86400)
    expired = await api.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert expired.status_code == 401 and expired.json()["errors"][0]["message"] == auth.BAD_REFRESH


async def test_logout_revokes_the_session(api, sessions):
    await a_user(sessions)
    tokens = await login(api)
    assert (await me(api, tokens["access_token"])).status_code == 200
    response = await api.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 204 and response.content == b""
    assert (await api.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401
    assert (await me(api, tokens["access_token"])).status_code == 401
    assert (await api.post("/v1/auth/logout", json={"refresh_token": "never-issued"})).status_code == 204


async def test_a_bearer_token_is_required_and_checked(api):
    missing = await api.get("/v1/auth/me")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["errors"][0]["type"] == "invalid_token"
    garbage = await api.get("/v1/auth/me", headers={"Authorization": "Bearer not.a.jwt"})
    assert garbage.status_code == 401 and garbage.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_revocation_reaches_access_tokens_within_the_cache_time(sessions, settings):
    """A process trusts a live session for AUTH_REVOCATION_CACHE_SECONDS, then asks again."""
    await a_user(sessions)
    moments = [1000.0]
    cache = auth.RevocationCache(5.0, clock=lambda: moments[0])
    async with sessions() as s:
        tokens = await auth.login_password(
            s, _keys(settings), settings, username="ada@example.com", password=PASSWORD, now=datetime.now(UTC)
        )
    sid = uuid.UUID(jwt.decode(tokens.access.token, options={"verify_signature": False})["sid"])
    async with sessions() as s:
        assert await auth.is_session_revoked(s, sid, cache) is False
        assert tokens.refresh_token is not None
        await auth.logout(s, refresh_token=tokens.refresh_token, now=datetime.now(UTC))
        moments[0] += 4.9
        assert await auth.is_session_revoked(s, sid, cache) is False  # still the cached answer
        moments[0] += 0.2
        assert await auth.is_session_revoked(s, sid, cache) is True
        moments[0] += 3600
        assert await auth.is_session_revoked(s, sid, cache) is True  # revoked for good
        assert await auth.is_session_revoked(s, uuid.uuid4(), cache) is True  # a family we never issued


def _keys(settings: Settings):
    from adapters.signing_keys import KeyStore

    return KeyStore.open(settings, datetime.now(UTC)).keyset()


async def test_rate_limits_hold_across_two_api_replicas(sessions, settings, temporal_env, clock):
    """Two app instances (two replicas) on one database count into the same windows: per address
    and per account. The attempt over the limit is 429 with Retry-After, in the one error shape."""
    await a_user(sessions)
    limited = settings.model_copy(update={"auth_rate_limit": "3/60"})
    bad = password_form(password="wrong password, again")
    async with (
        app_client(limited, temporal_env, clock, ("198.51.100.1", 1)) as a,
        app_client(limited, temporal_env, clock, ("198.51.100.1", 2)) as b,
        app_client(limited, temporal_env, clock, ("198.51.100.2", 3)) as other_address,
    ):
        for replica in (a, b, a):
            assert (await replica.post("/v1/auth/token", data=bad)).status_code == 401
        clock.advance(20)
        refused = await b.post("/v1/auth/token", data=password_form())  # the right password, over the limit
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "40"
        assert refused.json() == {
            "errors": [
                {"type": "rate_limited", "message": "too many attempts; retry after 40 s", "field": None, "in": None}
            ]
        }
        # The account is limited from any address; another account from another address is not.
        assert (await other_address.post("/v1/auth/token", data=password_form())).status_code == 429
        assert (await other_address.post("/v1/auth/token", data=password_form("eve@example.com"))).status_code == 401
        # The address is limited for every account, on the refresh route as well.
        assert (await a.post("/v1/auth/token", data=password_form("eve@example.com"))).status_code == 429
        assert (await b.post("/v1/auth/refresh", json={"refresh_token": "anything"})).status_code == 429
        clock.advance(40)  # the window is over
        tokens = (await b.post("/v1/auth/token", data=password_form())).json()
        assert "access_token" in tokens
        assert (await a.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 200


async def test_a_refresh_waits_for_the_row_lock_of_one_in_flight_and_is_then_reuse(sessions, settings):
    """Deterministic interleaving: another refresh holds the token's row (FOR UPDATE) and marks it
    used; ours must wait for it instead of reading the row unlocked, then see reuse."""
    await a_user(sessions)
    keys = _keys(settings)
    async with sessions() as s:
        tokens = await auth.login_password(
            s, keys, settings, username="ada@example.com", password=PASSWORD, now=datetime.now(UTC)
        )
    assert tokens.refresh_token is not None
    async with sessions() as holder, sessions() as ours:
        row = (
            await holder.exec(select(RefreshToken).where(col(RefreshToken.parent_id).is_(None)).with_for_update())
        ).one()
        attempt = asyncio.create_task(
            auth.refresh(ours, keys, settings, refresh_token=tokens.refresh_token, now=datetime.now(UTC))
        )
        await asyncio.sleep(0.3)
        assert not attempt.done(), "the refresh read the row without waiting for its lock"
        row.used_at = datetime.now(UTC)
        holder.add(row)
        await holder.commit()
        with pytest.raises(Unauthenticated) as refused:
            await attempt
    assert refused.value.message == auth.REUSED_REFRESH
    async with sessions() as s:
        assert all(r.revoked_at is not None for r in (await s.exec(select(RefreshToken))).all())


async def test_make_up_accounts_log_in_and_the_demo_client_logs_in_again_when_its_token_expires(
    sessions, auth_settings, temporal_env, clock
):
    from devstack.users import LOCAL_PASSWORDS, TokenLogin, ensure_demo_accounts, ensure_demo_tenant_admin

    assert auth_settings.database_url is not None
    operator, gateway = await ensure_demo_accounts(auth_settings.database_url, auth_settings)
    assert (operator.name, operator.secret) == ("operator@roomly.local", LOCAL_PASSWORDS["operator"])
    tenant_id = await a_tenant(sessions)
    tenant_admin = await ensure_demo_tenant_admin(auth_settings.database_url, auth_settings, "ada@example.com")
    assert tenant_admin is not None
    assert await ensure_demo_tenant_admin(auth_settings.database_url, auth_settings, "nobody@example.com") is None
    elsewhere = auth_settings.model_copy(update={"environment": "test"})
    again, gateway = await ensure_demo_accounts(auth_settings.database_url, elsewhere)
    assert LOCAL_PASSWORDS["operator"] != again.secret != operator.secret  # random outside the local environment
    assert gateway.secret != LOCAL_PASSWORDS["gateway"]

    app = create_app(auth_settings, temporal_client=temporal_env.client, clock=clock)
    token_requests: list[str] = []

    async def count(request: httpx.Request) -> None:
        if request.url.path == "/v1/auth/token":
            token_requests.append(request.url.path)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=ADDRESS)
        for login_, expected in [(again, "operator_admin"), (tenant_admin, "tenant_admin"), (gateway, "meter_gateway")]:
            async with httpx.AsyncClient(
                transport=transport,
                base_url="http://localhost",
                auth=TokenLogin(login_),
                event_hooks={"request": [count]},
            ) as client:
                assert (await client.get("/v1/auth/me")).json()["roles"] == [expected]
        assert len(token_requests) == 3
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", auth=TokenLogin(gateway), event_hooks={"request": [count]}
        ) as client:
            assert (await client.get("/v1/auth/me")).status_code == 200
            clock.advance(600)  # its token expired: one 401, one new login, the request again
            found = await client.get("/v1/auth/me")
            assert found.status_code == 200 and found.json()["kind"] == "client"
        assert len(token_requests) == 5
    async with app_client(auth_settings, temporal_env, clock) as api:
        tokens = await login(api, **password_form("ada@example.com", LOCAL_PASSWORDS["tenant"]))
        assert (await me(api, tokens["access_token"])).json()["tenant_id"] == str(tenant_id)


async def test_token_answers_are_never_stored_for_idempotency_replays(api, sessions):
    await a_user(sessions)
    headers = {"Idempotency-Key": "login-1"}
    first = await api.post("/v1/auth/token", data=password_form(), headers=headers)
    second = await api.post("/v1/auth/token", data=password_form(), headers=headers)
    assert first.status_code == second.status_code == 200 and "idempotent-replayed" not in second.headers
    assert first.json()["refresh_token"] != second.json()["refresh_token"]
    async with sessions() as s:
        assert (await (await s.connection()).execute(text("SELECT count(*) FROM idempotency_records"))).scalar() == 0
