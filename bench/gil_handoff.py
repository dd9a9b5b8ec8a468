"""What a thread that waits without the GIL (a model step waiting for its GPU) loses when it needs the GIL
back while another thread (a saturated event loop) runs Python: it waits until the holder's switch interval
(`sys.setswitchinterval`, 5 ms by default) ends, so each hand-back can cost up to that interval.

    .venv/bin/python bench/gil_handoff.py [--wait-ms 2] [--intervals-ms 5,1,0.5] [--busy 0.5,0.9,1]

A "loop" thread runs pure Python for --busy of every millisecond (1: always); the main thread repeats a
--wait-ms sleep (the GIL released, as while a GPU computes) followed by a little Python (handing the result
over), and reports that cycle's mean and p99 for each switch interval. `tandem serve` sets the interval to
`server.GIL_SWITCH_INTERVAL_S` for this reason.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time


def cycle_ms(interval_s: float, busy: float, wait_s: float, cycles: int) -> tuple[float, float]:
    """Mean and p99 of the waiting thread's cycle (ms) beside a thread busy for `busy` of each ms."""
    sys.setswitchinterval(interval_s)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < 0.001 * busy:
                pass
            if busy < 1:
                time.sleep(0.001 * (1 - busy))

    other = threading.Thread(target=loop)
    other.start()
    times = []
    try:
        for _ in range(cycles):
            started = time.perf_counter()
            time.sleep(wait_s)
            sum(range(200))  # handing the result over: a little Python
            times.append(time.perf_counter() - started)
    finally:
        stop.set()
        other.join()
    times.sort()
    return 1000 * sum(times) / len(times), 1000 * times[len(times) * 99 // 100]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wait-ms", type=float, default=2.0, help="the GIL-free wait of each cycle")
    parser.add_argument("--intervals-ms", default="5,1,0.5", help="switch intervals to try")
    parser.add_argument("--busy", default="0.5,0.9,1", help="the other thread's busy shares to try")
    parser.add_argument("--cycles", type=int, default=300)
    args = parser.parse_args()
    print("| other thread busy | switch interval ms | cycle mean ms | cycle p99 ms |")
    print("| --- | --- | --- | --- |")
    for busy in (float(b) for b in args.busy.split(",")):
        for interval in (float(i) for i in args.intervals_ms.split(",")):
            mean, p99 = cycle_ms(interval / 1000, busy, args.wait_ms / 1000, args.cycles)
            print(f"| {busy:.0%} | {interval:g} | {mean:.2f} | {p99:.2f} |", flush=True)


if __name__ == "__main__":
    main()
