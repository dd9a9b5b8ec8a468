"""A worker pod joins only once its head answers (a late head made `ray start` give up like a finished run),
and leaves as soon as its head stops answering, instead of Ray's minute-long reconnect wait (the serving
pods of a finished job waited for the workers' CPU)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tandem.errors import UserError
from tandem.workloads.train.pod import leave_when_head_gone, resolved, wait_for_head


@pytest.fixture
def node() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for `ray start --block`: a process that runs until stopped."""
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_node_stops_once_the_head_no_longer_answers(node: subprocess.Popen[bytes]) -> None:
    started = time.monotonic()
    assert leave_when_head_gone(node, f"127.0.0.1:{closed_port()}", every=0.1, misses=3)
    assert node.wait(timeout=10) is not None
    assert time.monotonic() - started < 5


def test_the_node_stays_while_the_head_answers(node: subprocess.Popen[bytes]) -> None:
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen(64)
        address = f"127.0.0.1:{head.getsockname()[1]}"
        head.settimeout(10)
        result: list[bool] = []

        def watch() -> None:
            result.append(leave_when_head_gone(node, address, every=0.05))

        watcher = threading.Thread(target=watch)
        watcher.start()
        for _ in range(20):  # twenty probes, every one answered: the node must still run
            head.accept()[0].close()
        assert node.poll() is None
        node.terminate()  # the node ends by itself (the head ended the run): the watcher just returns
        watcher.join(timeout=10)
    assert result == [False]


def test_the_head_is_probed_where_it_was_when_the_node_joined() -> None:
    """The operator empties the head Service's endpoints as it deletes a gang, while the head still
    needs the workers' ranks for its final checkpoint: the probe must not depend on that name."""
    assert resolved("localhost:6379") in {"127.0.0.1:6379", "::1:6379"}
    assert resolved("no-such-head.invalid:6379") == "no-such-head.invalid:6379"


def test_a_worker_waits_for_a_head_that_starts_late() -> None:
    """The head's port opens after the worker started waiting: the wait ends then, not before."""
    port = closed_port()
    head = socket.socket()
    opened: list[float] = []

    def start_head_late() -> None:
        time.sleep(0.5)  # the head pod starting after its workers (the stand-in's own schedule)
        head.bind(("127.0.0.1", port))
        head.listen(64)
        opened.append(time.monotonic())

    late = threading.Thread(target=start_head_late)
    late.start()
    try:
        wait_for_head(f"127.0.0.1:{port}", time.monotonic() + 30, every=0.05)
        assert opened, "the wait ended before the head answered"
    finally:
        late.join()
        head.close()


def test_a_head_that_never_answers_fails_the_worker_naming_the_setting() -> None:
    with pytest.raises(UserError, match="workerWaitSeconds"):
        wait_for_head(f"127.0.0.1:{closed_port()}", time.monotonic() + 0.3, every=0.05)
