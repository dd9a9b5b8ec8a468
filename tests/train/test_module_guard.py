"""The module guard of these tests (conftest.py) ends the Ray processes this pytest run left behind and no
others: a Ray process of someone else on the host (a lifecycle run's pod, another test run) survives it,
in a session of its own, as one of this run's (in pytest's session, or a `spawned` one's) does not.

The processes are stand-ins whose command lines the guard's matcher takes for Ray's (real Ray would add
minutes and nothing the rule looks at: the rule reads only the command line and the session)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from rayguard import RunSessions, ray_processes

#: In a command line, the guard takes this for a raylet ("raylet" is one of its markers).
LOOKALIKE = "raylet-lookalike-of-test_module_guard"


def lookalike(*, own_session: bool) -> subprocess.Popen[str]:
    """A Python process named like a raylet that lives until it is killed or its stdin closes."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", LOOKALIKE],
        stdin=subprocess.PIPE,
        text=True,
        start_new_session=own_session,
    )


def test_the_guard_ends_this_runs_ray_processes_and_leaves_another_ones(
    spawned: list[subprocess.Popen[str]], wait_for: Callable[..., Any]
) -> None:
    run = RunSessions()  # as conftest's: this pytest's session, then the `spawned` ones it adopts
    before = set(run.ray_processes())
    started: list[subprocess.Popen[str]] = []
    try:
        foreign = lookalike(own_session=True)  # started by someone else: not through `spawned`
        started.append(foreign)
        ours = lookalike(own_session=True)  # as the tests start `tandem train` runs
        started.append(ours)
        spawned.append(ours)
        in_pytest = lookalike(own_session=False)  # as an in-process Ray instance's raylet
        started.append(in_pytest)
        everyone = {p.pid for p in started}
        # The matcher takes all three for Ray's (once each has exec'd: /proc shows an empty command line
        # for a moment after Popen returns): only their sessions tell them apart.
        sessions = {foreign.pid, ours.pid, os.getsid(0)}
        wait_for(lambda: set(ray_processes(sessions)) >= everyone, 60, "the lookalikes' command lines")

        run.adopt(spawned)  # what `spawned` does when its test ends
        left = run.end_ray_processes(spare=before, grace=0)

        assert foreign.pid not in left, "the guard killed a Ray process this run did not start"
        assert {ours.pid, in_pytest.pid} <= set(left)
        assert ours.wait(timeout=60) == -signal.SIGKILL
        assert in_pytest.wait(timeout=60) == -signal.SIGKILL
        assert foreign.poll() is None  # killed together with the others, it would be gone by now
        assert foreign.pid in ray_processes({foreign.pid})
    finally:
        for p in started:  # no children: killing each one ends it (its session may be pytest's)
            if p.poll() is None:
                p.kill()
                p.wait()
