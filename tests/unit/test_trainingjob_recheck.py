"""When the operator looks at a TrainingJob again without being woken by a change."""

from __future__ import annotations

from tandem.api.trainingjob import TrainingJobPhase, TrainingJobStatus
from tandem.operator.trainingjob.controller import RESYNC_SECONDS, RETRY_SECONDS, recheck_in
from tandem.operator.trainingjob.reconcile import Decision


def decision(phase: TrainingJobPhase, due_in: float | None) -> Decision:
    return Decision(status=TrainingJobStatus(phase=phase), due_in=due_in)


def test_a_job_is_looked_at_when_something_is_due_and_otherwise_rarely() -> None:
    running, done = TrainingJobPhase.RUNNING, TrainingJobPhase.SUCCEEDED
    assert 12 < recheck_in(decision(running, 12), retry=False) < 12.5  # type: ignore[operator]
    assert recheck_in(decision(running, None), retry=False) == RESYNC_SECONDS  # the safety net
    assert recheck_in(decision(running, 3600), retry=False) == RESYNC_SECONDS
    assert recheck_in(decision(done, None), retry=False) is None  # finished, no TTL: only changes
    assert 30 < recheck_in(decision(done, 30), retry=False) < 30.5  # type: ignore[operator]
    # Overdue (e.g. the backoff ran out while the old gang is still going away), or the API server
    # refused or was busy: soon, not at once (no busy loop) and not in a minute.
    assert recheck_in(decision(running, 0), retry=False) == RETRY_SECONDS
    assert recheck_in(decision(running, 20), retry=True) == RETRY_SECONDS
