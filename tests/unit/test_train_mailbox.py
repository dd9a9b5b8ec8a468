"""The training progress mailbox (a Ray actor in a run; its plain class here): what the driver drains."""

from __future__ import annotations

from typing import Any

from tandem.workloads.train.ray_runner import Mailbox


def steps(first: int, last: int) -> list[dict[str, Any]]:
    return [{"step": n, "loss": 1.0 / n} for n in range(first, last + 1)]


def test_a_batch_sent_again_after_a_late_delivery_counts_each_step_once() -> None:
    mailbox = Mailbox()
    mailbox.put_steps(steps(1, 10))  # rank 0 gave up waiting for this reply, but it arrived
    mailbox.put_steps(steps(1, 20))  # so its next batch carries steps 1-10 again
    assert [m["step"] for m in mailbox.drain().steps] == list(range(1, 21))


def test_a_restarted_worker_group_reports_its_steps_again_from_its_checkpoint() -> None:
    mailbox = Mailbox()
    mailbox.put_start()
    mailbox.put_steps(steps(1, 30))
    mailbox.put_start()  # a rank died; Ray Train's new group resumes from the checkpoint of step 20
    mailbox.put_steps(steps(21, 25))
    drained = mailbox.drain()
    assert [m["step"] for m in drained.steps] == [*range(1, 31), *range(21, 26)]
    assert drained.starts == 2
