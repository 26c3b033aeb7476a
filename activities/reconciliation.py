"""The payout reconciliation activity: a few lines over ``services.reconciliation``.

PSP errors are decided by the adapter: ``Transient`` (and ``Unknown``, which a read-only call
never raises) are retried by Temporal; ``Bug`` (e.g. an unknown payout id) and any service
refusal fail at once, non-retryable, typed. It heartbeats while it works.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.billing import heartbeating
from adapters.psp import Bug, Psp, Transient, Unknown
from services import reconciliation
from services.errors import ServiceError
from workflows.contracts import (
    ACT_RECONCILE_PAYOUT,
    ERR_PSP_BUG,
    ERR_PSP_TRANSIENT,
    ReconcilePayoutInput,
    ReconcilePayoutResult,
)

log = structlog.get_logger(__name__)


class ReconciliationActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], psp: Psp) -> None:
        self._sessions = sessions
        self._psp = psp

    def all(self) -> list[Callable[..., object]]:
        return [self.reconcile_payout]

    @activity.defn(name=ACT_RECONCILE_PAYOUT)
    async def reconcile_payout(self, data: ReconcilePayoutInput) -> ReconcilePayoutResult:
        try:
            async with heartbeating(), self._sessions() as session:
                done = await reconciliation.reconcile_payout(session, self._psp, data.payout_id)
        except (Transient, Unknown) as err:
            raise ApplicationError(err.message, type=ERR_PSP_TRANSIENT) from err
        except Bug as err:
            raise ApplicationError(err.message, type=ERR_PSP_BUG, non_retryable=True) from err
        except ServiceError as err:
            raise ApplicationError(str(err), type=type(err).__name__, non_retryable=True) from err
        report = done.report
        log.info(
            "payout reconciled",
            payout_id=report.payout_id,
            matched=report.matched,
            missing_ours=report.missing_ours,
            missing_psp=report.missing_psp,
            amount_mismatch=report.amount_mismatch,
            postings_created=done.postings_created,
        )
        return ReconcilePayoutResult(
            payout_id=report.payout_id,
            currency=report.currency,
            amount=report.amount,
            matched=report.matched,
            missing_ours=report.missing_ours,
            missing_psp=report.missing_psp,
            amount_mismatch=report.amount_mismatch,
            all_matched=report.all_matched,
            postings_created=done.postings_created,
        )
