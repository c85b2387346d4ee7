"""Running a job, start to finish: the one place that starts an `UpgradeJob`, hands it to the code that
does the work, and ends it with the right status.

An install, upgrade, rollback or uninstall goes to `procedure.perform`; a check goes to
`detection.find_upgrades`. Whatever they raise becomes the job's end state here, so a job row never
stays running behind an error. The django-q2 task, the commands' foreground mode and the periodic
check (check, then the automatic upgrades) all run jobs through `run`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backends_app import detection, oci, procedure
from backends_app.disk import layout
from backends_app.models import JobKind, JobStatus, UpgradeJob

log = logging.getLogger(__name__)

#: Called with the job after each change of phase or progress (the commands draw a progress bar).
Observer = Callable[[UpgradeJob], None]
#: Called with a finished check's report; returns a note for the check job's message.
AfterCheck = Callable[[detection.CheckReport], str]


def run(
    job_id: int, observer: Observer | None = None, *, after_check: AfterCheck | None = None
) -> UpgradeJob:
    """Run one queued job to its end in this process, and return it as it ended.

    A job no longer queued (cancelled meanwhile, or taken by another worker) is returned untouched.
    `after_check` runs after a check job's look-up, before the job ends (the periodic check queues
    the automatic upgrades there, so the check job's message tells both).
    """
    job = UpgradeJob.objects.select_related("backend__gallery", "node").get(pk=job_id)
    if not job.start():
        return job
    if job.kind == JobKind.CHECK:
        run_check(job, requested_by=job.requested_by, after=after_check)
    else:
        _run_operation(job, observer)
    job.refresh_from_db()
    return job


def _run_operation(job: UpgradeJob, observer: Observer | None) -> None:
    try:
        message = procedure.perform(job, observer)
    except procedure.Cancelled as exc:
        job.finish(str(exc), status=JobStatus.CANCELLED)
    except procedure.RolledBack as exc:
        job.fail(str(exc), status=JobStatus.ROLLED_BACK)
    except (procedure.ProcedureError, oci.OCIError, layout.LayoutError, OSError) as exc:
        job.fail(procedure.describe_failure(exc))
    except Exception as exc:  # the job row must never stay "running" behind an unexpected error
        log.exception("job %s failed unexpectedly", job.pk)
        job.fail(f"unexpected error: {procedure.describe_failure(exc)}")
    else:
        job.finish(message)


def run_check(job: UpgradeJob | None, *, requested_by: str, after: AfterCheck | None = None) -> str:
    """Look for upgrades as the running check `job`, then `after(report)`; returns the outcome in one line.

    With `job` None the check runs without a row of its own (the periodic check does that when a
    check asked by hand is already active, so the interval's automatic upgrades are not lost).
    The job ends succeeded when every backend was checked, partly failed when some could not be,
    failed when none could or the check itself broke.
    """
    nodes = [job.node] if job is not None and job.node is not None else None
    try:
        report = detection.find_upgrades(nodes=nodes, requested_by=requested_by, job=job)
    except detection.CheckCancelled as exc:
        if job is not None:
            job.finish(str(exc), status=JobStatus.CANCELLED)
        return "cancelled"
    except Exception as exc:  # the row must never stay "running"
        log.exception("the upgrade check (job %s) failed", job.pk if job else "-")
        if job is not None:
            job.fail(f"check failed: {exc}")
        return f"failed: {exc}"
    note = ""
    if after is not None:
        try:
            note = after(report)
        except Exception as exc:
            log.exception("after the upgrade check (job %s)", job.pk if job else "-")
            note = f"after the check: {exc}"
    message = f"{report.summary()}; {note}" if note else report.summary()
    if job is not None:
        if report.outcome == JobStatus.FAILED:
            job.fail(message)
        else:
            job.finish(message, status=report.outcome)
    return message
