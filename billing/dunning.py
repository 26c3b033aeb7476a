"""Dunning campaigns, pure: when each retry comes, which notice goes with it, and what is chased.

A campaign is data: the delays of its retries after the first failed payment (default 1 h, 24 h
and 72 h) and a minimum overdue amount below which nothing is chased. Its steps, in order::

    first failure      -> notice: reminder       (the next retry's time)
    retry 1 fails      -> notice: warning
    retry 2 fails      -> notice: final notice   (the last retry; after it, suspension)
    last retry fails   -> subscription suspended (notice: suspended)

A payment at any time ends the campaign (and resumes a suspended subscription once nothing
overdue remains).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

DEFAULT_RETRY_DELAYS = (timedelta(hours=1), timedelta(hours=24), timedelta(hours=72))


class DunningStage(StrEnum):
    reminder = "reminder"
    warning = "warning"
    final_notice = "final_notice"
    suspended = "suspended"
    resolved = "resolved"  # paid: dunning ended
    not_chased = "not_chased"  # excluded, below the minimum, or nothing overdue


# The notice sent when a stage is entered.
STAGE_NOTICES = {
    DunningStage.reminder: "dunning_reminder",
    DunningStage.warning: "dunning_warning",
    DunningStage.final_notice: "dunning_final",
    DunningStage.suspended: "subscription_suspended",
}


@dataclass(frozen=True)
class Campaign:
    code: str
    retry_delays: tuple[timedelta, ...] = DEFAULT_RETRY_DELAYS  # after the first failure, each from it
    min_overdue: int = 0  # minor units: less than this overdue is not chased
    excluded: bool = False  # a tenant excluded from dunning

    def __post_init__(self) -> None:
        if not self.retry_delays:
            raise ValueError("a campaign needs at least one retry")
        if any(d <= timedelta(0) for d in self.retry_delays) or list(self.retry_delays) != sorted(self.retry_delays):
            raise ValueError("retry delays must be positive and increasing (each counted from the first failure)")
        if self.min_overdue < 0:
            raise ValueError("the minimum overdue amount cannot be negative")

    def chases(self, overdue: int) -> bool:
        return not self.excluded and overdue > 0 and overdue >= self.min_overdue

    def retry_at(self, first_failure: datetime, retry: int) -> datetime:
        """When retry ``retry`` (1-based) is due."""
        return first_failure + self.retry_delays[retry - 1]

    @property
    def retries(self) -> int:
        return len(self.retry_delays)


def stage_after_failures(failures: int, retries: int) -> DunningStage:
    """The stage after ``failures`` failed payments (the first failure counts): reminder, warning,
    then final notice before the last retry, and suspended once the last retry failed too."""
    if failures < 1:
        raise ValueError("dunning starts at the first failure")
    if failures > retries:
        return DunningStage.suspended
    if failures == retries:
        return DunningStage.final_notice
    return DunningStage.reminder if failures == 1 else DunningStage.warning
