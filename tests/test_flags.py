"""Feature flags (core/flags.py): resolved from FLAG_* variables over the JSON file over the
defaults, read through OpenFeature; the two flags gate what they name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core import flags
from schema.models import DunningCampaign
from services import dunning
from tests import factories
from tests.test_api_support import api_client

pytestmark = pytest.mark.db


@pytest.fixture(autouse=True)
def defaults_after() -> Iterator[None]:
    yield
    flags.configure(None, {})


def test_variables_override_the_file_which_overrides_the_defaults(tmp_path: Path):
    file = tmp_path / "flags.json"
    file.write_text(json.dumps({"payment-methods.save": False, "dunning.campaign-selection": False}))
    assert flags.resolve(None, {}) == {"payment-methods.save": True, "dunning.campaign-selection": True}
    assert flags.resolve(file, {}) == {"payment-methods.save": False, "dunning.campaign-selection": False}
    assert flags.resolve(file, {"FLAG_DUNNING_CAMPAIGN_SELECTION": "true"})["dunning.campaign-selection"] is True
    flags.configure(file, {"FLAG_PAYMENT_METHODS_SAVE": "TRUE"})
    assert flags.enabled("payment-methods.save") is True
    assert flags.enabled("dunning.campaign-selection") is False


@pytest.mark.parametrize(
    ("content", "environ", "message"),
    [
        ('{"payment-methods.sepa": true}', {}, "unknown flags: payment-methods.sepa"),
        ('{"payment-methods.save": "yes"}', {}, "must be true or false"),
        ("[true]", {}, "JSON object"),
        ("{", {}, "FEATURE_FLAGS_FILE"),
        ("{}", {"FLAG_PAYMENT_METHODS_SAVE": "1"}, "FLAG_PAYMENT_METHODS_SAVE must be true or false"),
    ],
)
def test_a_bad_flag_refuses_to_start(tmp_path: Path, content: str, environ: dict[str, str], message: str):
    file = tmp_path / "flags.json"
    file.write_text(content)
    with pytest.raises(flags.FlagError, match=message):
        flags.configure(file, environ)


async def test_saving_a_payment_method_is_behind_its_flag(sessions, settings, temporal_env, monkeypatch):
    monkeypatch.setenv("FLAG_PAYMENT_METHODS_SAVE", "false")
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), datetime.now(UTC))
    async with api_client(settings, temporal_env.client) as api:
        refused = await api.post(f"/v1/tenants/{sub.tenant_id}/payment-method", json={"payment_method": "pm_card_visa"})
    assert refused.status_code == 404
    assert refused.json()["errors"][0]["type"] == "feature_disabled"


async def test_campaign_selection_off_gives_every_tenant_the_default(sessions):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, datetime.now(UTC))
    async with sessions() as s:
        s.add(DunningCampaign(code="vip", name="VIP", retry_delays=[7200], tenant_id=sub.tenant_id))
        s.add(DunningCampaign(code="default", name="Default", retry_delays=[60, 120]))
        await s.commit()
    async with sessions() as s:
        assert (await dunning.campaign_for(s, sub.tenant_id)).code == "vip"
        flags.configure(None, {"FLAG_DUNNING_CAMPAIGN_SELECTION": "false"})
        assert (await dunning.campaign_for(s, sub.tenant_id)).code == "default"
