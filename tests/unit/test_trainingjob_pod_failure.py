"""What a failed training pod's record says: its exit, and the error it died of when its log said one."""

from __future__ import annotations

from typing import Any

from tandem.operator.trainingjob.observe import LAST_WORDS_CHARS, observe_pod


def failed_pod(message: str | None) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 1, "reason": "Error"}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": "gpt-1-head", "labels": {}},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "head", "state": {"terminated": terminated}}],
        },
    }


def test_the_failure_ends_with_the_last_line_the_container_wrote() -> None:
    log_tail = "step 20\nTraceback (most recent call last):\n  ...\nRuntimeError: NCCL timeout on rank 1\n\n"
    assert observe_pod(failed_pod(log_tail)).failure == (
        "container head exited with code 1 (Error): RuntimeError: NCCL timeout on rank 1"
    )


def test_without_a_message_the_exit_alone_is_said_and_a_long_line_is_cut() -> None:
    assert observe_pod(failed_pod(None)).failure == "container head exited with code 1 (Error)"
    failure = observe_pod(failed_pod("x" * 5000)).failure
    assert failure.endswith("x" * LAST_WORDS_CHARS)
    assert len(failure) < LAST_WORDS_CHARS + 100
