"""Fair use per buyer org: how many jobs may wait, and how many bytes of code it may keep stored.

One buyer queued unlimited jobs and stored a gigabyte of bundles in four requests (review 11.14).
Both are counted in the submitting transaction, so concurrent submissions see each other's rows.
"""

from __future__ import annotations

from sqlalchemy import func, select

from sandbox.context import Context
from sandbox.errors import TooManyRequests
from sandbox.jobs.lifecycle import JobState
from sandbox.store.models import Job

WAITING = (JobState.PENDING_APPROVAL.value, JobState.QUEUED.value)
WAITING_RETRY_S = 60
# Stored code is kept with its job; space comes back only when an operator raises the limit or
# removes old jobs, so the hint is long.
STORAGE_RETRY_S = 3600


def require_org_quota(ctx: Context, *, org: str, incoming_bytes: int) -> None:
    """Raise TooManyRequests if `org` has too many waiting jobs, or the new bundle would pass its storage."""
    settings = ctx.settings
    waiting = ctx.session.execute(
        select(func.count()).select_from(Job).where(Job.buyer_org == org, Job.state.in_(WAITING))).scalar_one()
    if waiting >= settings.max_waiting_jobs_per_org:
        raise TooManyRequests(
            f"org {org} already has {waiting} jobs waiting (at most {settings.max_waiting_jobs_per_org}); "
            "submit more once some have started", retry_after_s=WAITING_RETRY_S)
    stored = ctx.session.execute(
        select(func.coalesce(func.sum(Job.code_bytes), 0)).where(Job.buyer_org == org)).scalar_one()
    if int(stored) + incoming_bytes > settings.max_bundle_bytes_per_org:
        raise TooManyRequests(
            f"org {org} stores {int(stored)} bytes of job code; this bundle ({incoming_bytes} bytes unpacked) "
            f"would pass its limit of {settings.max_bundle_bytes_per_org}", retry_after_s=STORAGE_RETRY_S)
