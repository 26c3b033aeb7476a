"""Dunning: the campaign's rule (pure), the database side (campaigns, what is outstanding,
suspension that keeps what was paid for, resumption), and the workflow on time-skipping Temporal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing.dunning import Campaign, DunningStage, stage_after_failures

H = timedelta(hours=1)


def test_the_default_campaign_escalates_reminder_warning_final_then_suspends():
    campaign = Campaign("default")
    assert [stage_after_failures(n, campaign.retries) for n in (1, 2, 3, 4)] == [
        DunningStage.reminder,
        DunningStage.warning,
        DunningStage.final_notice,
        DunningStage.suspended,
    ]
    first = datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert [campaign.retry_at(first, n) for n in (1, 2, 3)] == [
        datetime(2026, 3, 1, 10, tzinfo=UTC),
        datetime(2026, 3, 2, 9, tzinfo=UTC),
        datetime(2026, 3, 4, 9, tzinfo=UTC),
    ]


def test_a_one_retry_campaign_gives_the_final_notice_at_once():
    assert [stage_after_failures(n, 1) for n in (1, 2)] == [DunningStage.final_notice, DunningStage.suspended]
    with pytest.raises(ValueError):
        stage_after_failures(0, 3)


def test_what_a_campaign_chases():
    campaign = Campaign("c", (H, 2 * H), min_overdue=500)
    assert not campaign.chases(0) and not campaign.chases(499) and campaign.chases(500)
    assert not Campaign("x", excluded=True).chases(10_000)
    for bad in [(), (2 * H, H), (timedelta(0),), (-H,)]:
        with pytest.raises(ValueError):
            Campaign("bad", bad)
    with pytest.raises(ValueError):
        Campaign("bad", min_overdue=-1)
