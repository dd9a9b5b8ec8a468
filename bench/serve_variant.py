"""`tandem serve` with benchmark-only changes, set by environment variables, for variants of one run:

- TANDEM_BENCH_FAKE_STEP_MS: the causal-lm runtime's decoding step replaced by a stand-in for a fast
  accelerator: it sleeps that many milliseconds (the GIL is free meanwhile, as while a GPU computes) and
  returns a token per sequence computed from its ids (`fake_token`: printable ASCII, never EOS). Everything
  else is the real server: HTTP, protocols, tokenizing, the scheduler, text, metrics. Why: on a CPU the
  model's arithmetic hides what the server itself costs per request and per token; on a GPU a step of GPT
  124M at batch 256 is ~2 ms and the event loop's work is what bounds one process. This puts a 2-core dev
  machine in the GPU's regime (`bench/serve_lm_mixed.py --fake-step-ms`).
- TANDEM_BENCH_SWITCH_INTERVAL_MS: the GIL switch interval of the server process(es) instead of
  `server.GIL_SWITCH_INTERVAL_S` (e.g. 5, Python's default, to measure what the server's setting gives).

    TANDEM_BENCH_FAKE_STEP_MS=2 python bench/serve_variant.py --runtime causal-lm --model-uri DIR ...

Workers (`--workers N`) are spawned interpreters that import this file again as their main module, so they
get the same changes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

#: The environment variables (milliseconds).
STEP_MS_ENV = "TANDEM_BENCH_FAKE_STEP_MS"
SWITCH_MS_ENV = "TANDEM_BENCH_SWITCH_INTERVAL_MS"


def fake_token(ids: Sequence[int]) -> int:
    """The next token of a context: printable ASCII, a function of the context alone (so every variant
    gives the same answers)."""
    return 32 + (len(ids) * 7 + ids[-1]) % 95


def use_fake_step(model_class: Any, step_ms: float) -> None:
    """Replace `model_class.step` (the runtime's decoding step) by the stand-in."""
    seconds = step_ms / 1000

    def step(self: Any, batch: Sequence[Any]) -> list[int]:
        time.sleep(seconds)
        return [fake_token(seq.ids) for seq in batch]

    model_class.step = step


def apply_environment() -> None:
    """The changes the environment asks for, in this process."""
    if os.environ.get(STEP_MS_ENV):
        from tandem.workloads.serve.runtimes.causal_lm import CausalLM

        use_fake_step(CausalLM, float(os.environ[STEP_MS_ENV]))
    if os.environ.get(SWITCH_MS_ENV):
        from tandem.workloads.serve import server

        seconds = float(os.environ[SWITCH_MS_ENV]) / 1000
        server.GIL_SWITCH_INTERVAL_S = seconds  # read by run_server (from this change on)
        sys.setswitchinterval(seconds)  # an older copy of the package (--before) sets none


if __name__ in ("__main__", "__mp_main__"):  # run, or a spawned worker importing it as its main module
    apply_environment()

if __name__ == "__main__":
    from tandem.workloads.serve.cli import main

    sys.exit(main())
